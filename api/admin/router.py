"""`/admin`: the dashboard's routes, gathered under one router that the app includes."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from api.admin import auth
from api.admin.views import jobs, overview, reports, resources, tenants, users
from api.admin.web import HERE, admin_lifespan, admin_router
from api.errors import NotFound

# The app includes this one router; its lifespan builds the dashboard's state at startup.
router = APIRouter(lifespan=admin_lifespan, include_in_schema=False)
files = admin_router()

_STATIC = {"admin.css": "text/css", "admin.js": "text/javascript"}


@files.get("/static/{name}")
def static(name: str) -> Response:
    """The stylesheet and the script (two files: no static-files mount needed)."""
    media_type = _STATIC.get(name)
    if media_type is None:
        raise NotFound("No such file.")
    return Response(
        (HERE / "static" / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


@files.get("/")
def slash() -> RedirectResponse:
    return RedirectResponse("/admin", 308)


router.include_router(files)
for module in (auth, overview, tenants, users, jobs, resources, reports):
    router.include_router(module.router)
