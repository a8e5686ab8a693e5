"""The web page (``/``, its static files) and the image its Demo button loads (``/demo-image``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import ServiceError
from ..state import AppState, state_of

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/demo-image")
async def demo_image(state: AppState = Depends(state_of)):
    demo = state.settings.demo_image
    if not demo or not Path(demo).is_file():
        raise ServiceError(404, "not_found", "no demo image configured (casc serve --demo-image PATH)")
    return FileResponse(demo)
