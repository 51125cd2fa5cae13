"""Route: the tenants' web console, `GET /ui` and its static files under `/ui/static/`.

The console is static: the page holds no data, and every data call it makes carries the API
key the user typed (so these paths are the only ones AuthMiddleware lets through unauthenticated,
and only for GET/HEAD). Files are served from a fixed table built at start-up, never by a path
taken from the request. The Content-Security-Policy allows scripts, styles and requests from this
origin only: no inline script, nothing fetched from a third party.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parents[2] / "ui" / "static"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded server never runs a stale script
}

router = APIRouter(include_in_schema=False)


def static_files(root: Path) -> dict[str, Path]:
    """name → file for every servable asset; the request can only pick one of these. An install
    without the files (package data left out) serves the API and answers /ui with a 404."""
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


STATIC_FILES = static_files(STATIC_DIR)


@router.api_route("/ui", methods=["GET", "HEAD"])
async def console() -> FileResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise NotFound("the web console's files are not installed with this server")
    return FileResponse(page, media_type="text/html", headers=HEADERS)


@router.api_route("/ui/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    path = STATIC_FILES.get(name)
    if path is None:
        raise NotFound(f"no console file named {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
