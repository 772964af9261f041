"""The built-in uncertainty page: GET /dashboard and its static assets, from the package."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static" / "dashboard"

router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    """The page itself; it talks to the public JSON API only."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


# Mounted on the router so that create_app needs a single include line.
router.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
