"""The receiver's ASGI app: `create_app(settings)` wires queue, store, auth and routes.

There is no module-level app: each call builds one from its settings, so tests
and several receivers in one process never share state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from trainfleet import __version__
from trainfleet.errors import LeaseLost, PayloadTooLarge, TrainfleetError
from trainfleet.receiver import dashboard, enrollment, metrics
from trainfleet.receiver.hot_routes import HotLane
from trainfleet.receiver.routes import router
from trainfleet.receiver.settings import ReceiverSettings
from trainfleet.receiver.state import ReceiverState

log = logging.getLogger("trainfleet.receiver")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(
    settings: ReceiverSettings,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    *,
    hot_lane: bool = True,
) -> FastAPI:
    """Build a receiver; raises ManifestError when the manifest is invalid.

    The clocks are parameters so tests can step the wall clock. `hot_lane=False` leaves the
    worker's claim, heartbeat and complete to FastAPI too: tests compare the two answers.
    """
    state = ReceiverState(settings, wall, monotonic)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(state))
        # What the receiver built to start (its modules, the manifest) lives as long as it
        # does: kept out of the garbage collector's sight, a full collection no longer walks
        # it, which had stopped the event loop for 35-50 ms (bench/README.md, group commit).
        gc.collect()  # what is garbage already is freed, not frozen
        gc.freeze()
        try:
            yield
        finally:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
            await state.stop_pruning()  # the queue must not be closed under its read
            state.queue.close()

    app = FastAPI(
        title="trainfleet receiver",
        version=__version__,
        summary="Trains each model of a project exactly once across a fleet.",
        lifespan=lifespan,
    )
    app.state.receiver = state
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(enrollment.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    if hot_lane:  # innermost: inside the body limit and the latency metric
        app.add_middleware(HotLane, receiver_app=app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(metrics.LatencyMiddleware, metrics=state.metrics)
    return app


async def _sweep_forever(state: ReceiverState) -> None:
    while True:
        await asyncio.sleep(state.settings.sweep_interval_s)
        try:
            state.sweep()
            state.prune_soon()
        except Exception:  # keep sweeping: one failed pass must not end the task
            log.exception("stale sweep failed")


def _error(status: int, message: str, detail: Any = None, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status,
                        headers=headers or None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TrainfleetError)
    async def trainfleet_error(request: Request, exc: TrainfleetError) -> JSONResponse:
        if isinstance(exc, LeaseLost):
            request.app.state.receiver.metrics.fenced.inc()
        return _error(exc.status, exc.message, exc.detail, **exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        detail = [{"loc": list(err["loc"]), "msg": err["msg"]} for err in exc.errors()]
        return _error(422, "; ".join(problems), detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(sqlite3.OperationalError)
    async def database_busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        if "locked" in str(exc) or "busy" in str(exc):
            return _error(503, "database is busy; retry", None, **{"Retry-After": "1"})
        raise exc

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return _error(400, "body: the client went away before sending all of it")


class BodyLimit:
    """Refuses request bodies over their route's limit, by header and while streaming."""

    def __init__(self, app: ASGIApp, settings: ReceiverSettings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, scope: Scope) -> int:
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "PUT" and path.startswith("/v1/model/"):
            return self.settings.max_upload_bytes
        if method == "PUT" and path.endswith("/log"):
            return self.settings.max_log_bytes
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _error(413, PayloadTooLarge(limit).message, {"max_bytes": limit})(
                scope, receive, send
            )
            return
        seen = 0
        refused = started = replaced = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                refused = True
                raise PayloadTooLarge(limit)
            return message

        async def answer(message: Message) -> None:
            # FastAPI answers any error while reading a JSON body with its own 400: once the
            # body is refused, the client gets our 413 instead of whatever the app made of it.
            nonlocal started, replaced
            if replaced:
                return
            if refused and not started:
                replaced = True
                await _error(413, PayloadTooLarge(limit).message, {"max_bytes": limit})(
                    scope, receive, send
                )
                return
            started = True
            await send(message)

        await self.app(scope, counted, answer)
