"""The liveness endpoint (/healthz) and Prometheus text (/metrics) on XPO_HEALTH_PORT.

kopf's own liveness server serves a single path, and the chart expects both on one port, so a small
aiohttp app serves them: /healthz answers 200 once the operator is up and its event loop responds
(it is served by that same loop), 503 before startup completes.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from .metrics import METRICS


async def start(port: int, ready: asyncio.Event, api_requests: Callable[[], object] | None = None,
                host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104 -- probes come from the kubelet
    async def healthz(_: web.Request) -> web.Response:
        if not ready.is_set():
            return _closing(web.json_response({"status": "starting"}, status=503))
        return _closing(web.json_response({"status": "ok"}))

    async def metrics(_: web.Request) -> web.Response:
        requests = api_requests() if api_requests else None
        return _closing(web.Response(text=METRICS.render(requests),  # type: ignore[arg-type]
                                     content_type="text/plain", charset="utf-8"))

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _closing(response: web.Response) -> web.Response:
    # No keep-alive: an idle probe connection would otherwise hold a task that kopf's shutdown waits
    # for (5 s) before cancelling it. Probes are rare; a new connection each time costs nothing.
    response.force_close()
    return response
