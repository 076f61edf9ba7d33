"""The web page at `/`: static HTML, CSS and JS shipped in capsnet/service/static/, no build step, nothing
loaded from outside the service (it works offline).

The page and its files hold no model data, so they stay open when an API key is set: a browser cannot
send a bearer header when it navigates, and the page asks for the key and sends it on every API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
OPEN_EXACT = ("/",)  # paths the API key does not guard, matched exactly
OPEN_PREFIXES = ("/static/",)  # ... and by prefix

# Everything the page uses comes from this origin; pictures are blob: URLs of API answers.
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CSP})


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
