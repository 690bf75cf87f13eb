"""Ops routes on the HTTP port: /metrics (Prometheus text), /dashboard (page, vendored assets, JSON state),
and the dashboard's admin actions (scale a group, re-place hot experts), which need the admin token in
the `X-Emoe-Admin-Token` header. Read-only routes are open; without a configured admin token the actions
are refused."""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

ASSETS = {
    "uPlot.iife.min.js": "application/javascript",
    "uPlot.min.css": "text/css",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}


def _asset(name: str) -> bytes:
    base = resources.files("cluster").joinpath("static")
    path = base.joinpath("vendor", name) if name.startswith("uPlot") else base.joinpath(name)
    return path.read_bytes()


def add_ops_routes(app: FastAPI, ops: Any, registry: Any, admin_token: str | None) -> None:
    """`ops` is an `OpsState`; `registry` a handle to the Registry deployment."""

    def admin(request: Request) -> JSONResponse | None:
        given = request.headers.get("x-emoe-admin-token", "")
        if admin_token is None:
            return JSONResponse({"error": "no admin token configured: dashboard actions are disabled"}, 403)
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            return JSONResponse({"error": "admin token missing or wrong"}, 401)
        return None

    @app.get("/metrics")
    async def metrics() -> Response:
        if not ops.snapshot:
            await ops.refresh()
        return PlainTextResponse(ops.prometheus_text(), media_type="text/plain; version=0.0.4")

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(resources.files("cluster").joinpath("static", "dashboard.html").read_text())

    @app.get("/dashboard/static/{name}")
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return JSONResponse({"error": f"no asset {name!r}"}, 404)
        return Response(_asset(name), media_type=ASSETS[name])

    @app.get("/dashboard/api/state")
    async def state() -> JSONResponse:
        return JSONResponse(_finite(ops.state()))

    @app.post("/dashboard/api/replace")
    async def replace(request: Request) -> JSONResponse:
        if (refused := admin(request)) is not None:
            return refused
        return JSONResponse(_finite(await registry.replace.remote()))

    @app.post("/dashboard/api/scale")
    async def scale(request: Request) -> JSONResponse:
        if (refused := admin(request)) is not None:
            return refused
        body = await request.json()
        group, replicas = body.get("group"), body.get("replicas")
        if not isinstance(group, int) or not 0 <= group < ops.num_groups:
            return JSONResponse({"error": f"group: expected an integer in [0, {ops.num_groups})"}, 400)
        if replicas is not None and (not isinstance(replicas, int) or replicas < 0):
            return JSONResponse({"error": "replicas: expected an integer >= 0, or null to release"}, 400)
        return JSONResponse({"overrides": await registry.set_override.remote(group, replicas)})


def _finite(x: Any) -> Any:
    """JSON has no NaN / Infinity: they become null."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
