"""The worker's hot calls (claim, heartbeat, complete) answered without FastAPI's per-request
machinery, because that machinery cost as much as the queue itself.

A worker's cycle is these three POSTs. Through FastAPI each one pays for routing through every
route, re-solving its dependency tree, telemetry and exit stacks: about half of the receiver's
time per cycle (bench/README.md). `HotLane` sits in front of FastAPI's router and answers
exactly these three paths itself. It does what FastAPI would, in FastAPI's order, with FastAPI's
own pieces, so that nothing a client can see changes:

1. read the body; a JSON body only under a JSON content type (else the raw bytes, which the
   model then refuses); bad JSON: 422 naming `body` and the position; a broken read: 400;
2. the route's dependencies: `routes.worker_auth` (then `routes.worker_job_auth` on a job);
3. the path parameter and the body, validated by the route's own fields (422 naming them);
4. the route's own endpoint function from routes.py, whose answer is serialised by the
   route's own response field.

Errors go to the app's exception handlers (app.py), as they would from FastAPI. The routes are
still declared in routes.py: /openapi.json and /docs describe them, and any path or method not
matched here (a trailing slash, GET, a mounted prefix) goes on to FastAPI unchanged.
tests/test_hot_routes.py sends the same requests both ways and compares the answers.
"""

from __future__ import annotations

import email.message
import inspect
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from trainfleet.receiver import routes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
JobEndpoint = Callable[[str, Any, Request], Awaitable[Any]]

PREFIX = "/v1/job/"
UNDEFINED = object()  #: no body at all (FastAPI's Undefined): "Field required"


class HotLane:
    """ASGI middleware answering POST /v1/job/claim, /v1/job/{job_ref}/heartbeat and
    /v1/job/{job_ref}/complete; everything else goes on to `app`."""

    def __init__(self, app: ASGIApp, receiver_app: FastAPI) -> None:
        self.app = app
        self.owner = receiver_app
        # routes.router's own routes (FastAPI keeps an included router as one entry): app.py
        # includes it with no prefix or dependencies of its own, which _check cannot see.
        found = {(r.path, m): r for r in routes.router.routes if isinstance(r, APIRoute)
                 for m in r.methods or ()}
        self.claim_route = found[("/v1/job/claim", "POST")]
        self.job_routes: dict[str, tuple[APIRoute, JobEndpoint]] = {
            "heartbeat": (found[("/v1/job/{job_ref}/heartbeat", "POST")], routes.heartbeat),
            "complete": (found[("/v1/job/{job_ref}/complete", "POST")], routes.complete),
        }
        _check(self.claim_route, routes.claim, [routes.worker_auth], path_params=0)
        for route, endpoint in self.job_routes.values():
            _check(route, endpoint, [routes.worker_job_auth], path_params=1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path")
                and not self.owner.dependency_overrides):  # overridden: FastAPI's to honour
            path: str = scope["path"]
            if path.startswith(PREFIX):
                rest = path[len(PREFIX):]
                if rest == "claim":
                    await self._serve(scope, receive, send, self.claim_route, None)
                    return
                ref, slash, verb = rest.partition("/")
                if ref and slash and verb in self.job_routes:
                    await self._serve(scope, receive, send, *self.job_routes[verb], ref)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, route: APIRoute,
                     endpoint: JobEndpoint | None, ref: str | None = None) -> None:
        scope["route"] = route  # what FastAPI's router sets: the latency metric's label
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {} if ref is None else {"job_ref": ref}
        request = Request(scope, receive)
        try:
            # The queue writes of the requests served in this turn of the loop share one
            # COMMIT; the answer goes out once it is done (queue/group_commit.py).
            async with routes._state(request).queue.grouped():
                response = await self._answer(request, route, endpoint, ref)
        except Exception as exc:  # what FastAPI's ExceptionMiddleware does with it
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _answer(self, request: Request, route: APIRoute, endpoint: JobEndpoint | None,
                      ref: str | None) -> Response:
        body = await _read_body(request)
        # The dependencies, in the order FastAPI solves them: auth before any validation.
        token = request.headers.get("X-Worker-Token") or None  # APIKeyHeader, no auto_error
        host = await routes.worker_auth(request, token)
        errors: list[dict[str, Any]] = []
        if ref is not None:
            await routes.worker_job_auth(request, host)
            param = route.dependant.path_params[0]
            ref, path_errors = param.validate(ref, {}, loc=("path", param.alias))
            errors += path_errors
        field = route.body_field
        assert field is not None  # every hot route takes a JSON body
        if body is UNDEFINED:
            value: Any = None
            errors.append({"type": "missing", "loc": ("body",), "msg": "Field required",
                           "input": None})
        else:
            value, body_errors = field.validate(body, {}, loc=("body",))
            errors += body_errors
        if errors:
            raise RequestValidationError(errors, body=None if body is UNDEFINED else body)
        if endpoint is None or ref is None:
            answer = await routes.claim(value, request, host)
        else:
            answer = await endpoint(ref, value, request)
        if isinstance(answer, Response):
            return answer
        assert route.response_field is not None
        return Response(route.response_field.serialize_json(answer),
                        media_type="application/json")

    async def _handled(self, request: Request, exc: Exception) -> Response:
        handler = None
        for cls in type(exc).__mro__:
            handler = self.owner.exception_handlers.get(cls)
            if handler is not None:
                break
        if handler is None:
            raise exc  # to ServerErrorMiddleware: a 500, as from FastAPI
        answer = handler(request, exc)  # app.py's handlers are all `async def`
        response: Response = await answer if inspect.isawaitable(answer) else answer
        return response


def _check(route: APIRoute, endpoint: Any, dependencies: list[Any], path_params: int) -> None:
    """Refuse to start if a hot route was changed in routes.py in a way this lane does not
    do (another dependency, a query parameter...): the lane would silently skip it."""
    dependant = route.dependant
    found = [d.call for d in dependant.dependencies]
    if (route.endpoint is not endpoint or found != dependencies
            or len(dependant.path_params) != path_params or len(dependant.body_params) != 1
            or dependant.query_params or dependant.header_params or dependant.cookie_params
            or route.status_code is not None or route.response_field is None):
        raise RuntimeError(f"hot_routes.py does not serve {route.path} as routes.py now "
                           "declares it: update HotLane to match")


async def _read_body(request: Request) -> Any:
    """The body as FastAPI reads it for a JSON body parameter."""
    try:
        raw = await request.body()
        if not raw:
            return UNDEFINED
        content_type = request.headers.get("content-type")
        if not content_type:  # strict content type: not JSON, so the model refuses it
            return raw
        if content_type != "application/json":
            message = email.message.Message()
            message["content-type"] = content_type
            subtype = message.get_content_subtype()
            if message.get_content_maintype() != "application" or not (
                subtype == "json" or subtype.endswith("+json")
            ):
                return raw
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
              "input": {}, "ctx": {"error": exc.msg}}], body=exc.doc,
        ) from exc
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc
