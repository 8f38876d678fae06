"""The chat page: GET / (index.html) and its assets under /ui/ (no API key needed).

The page is a static OpenAI-API client (server/static/): it asks the user for the API key and
sends it as a Bearer token on its own /v1 calls, so serving it needs no credentials. Only the
files named in `ASSETS` are served (no directory lookups, hence no path traversal), with a
strict Content-Security-Policy: same-origin scripts, styles and fetches only, no inline code.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "app.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded server serves its own page
}

router = APIRouter(tags=["ui"], include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    """The chat page."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's own files."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no such file: /ui/{name}")
    return _file(name, media_type)
