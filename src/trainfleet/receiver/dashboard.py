"""The live dashboard: `GET /` serves one self-contained, read-only page.

The page (dashboard.html, packaged beside this module) polls the public JSON API and
never loads anything from another origin; the Content-Security-Policy makes sure of it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# Inline style and script only; fetch only from this receiver; nothing may frame the page.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@cache
def page() -> str:
    """The dashboard's HTML, read once from the installed package."""
    return resources.files(__package__ or "trainfleet.receiver").joinpath(
        "dashboard.html"
    ).read_text(encoding="utf-8")


@router.get(
    "/",
    response_class=HTMLResponse,
    summary="Live dashboard",
    description="A read-only HTML page that polls /v1/health, /v1/jobs and /v1/workers "
    "every 2 s: counts, jobs with progress, workers, recent failures and a job's detail.",
    responses={200: {"content": {"text/html": {}}, "description": "the dashboard page"}},
)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(page(), headers={
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })
