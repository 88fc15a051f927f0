"""Prometheus metrics of a pump pod: GET /metrics on `xml-pipeline pump --metrics-port N`.

Text exposition format 0.0.4, rendered from the pump's own counters on each scrape (no client
library). The pump sees every WorkerTask it submits and every result, so worker pods need no
endpoint of their own; on Redis the streams' lengths and pending counts (what an autoscaler of the
worker Deployment wants: tasks waiting) are read on each scrape, with the backend's timeouts.

Served by a daemon thread (http.server): a scrape never runs on the pump's event loop.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Sample:
    name: str
    kind: str  # counter | gauge
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(samples: Iterable[Sample]) -> str:
    """Samples in the Prometheus text format, one HELP/TYPE header per metric name."""
    lines: list[str] = []
    seen: set[str] = set()
    for s in samples:
        if s.name not in seen:
            seen.add(s.name)
            lines += [f"# HELP {s.name} {s.help}", f"# TYPE {s.name} {s.kind}"]
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
        value = int(s.value) if float(s.value).is_integer() else s.value
        lines.append(f"{s.name}{{{labels}}} {value}" if labels else f"{s.name} {value}")
    return "\n".join(lines) + "\n"


def pump_samples(pump: Any, organism: str, backend_type: str,
                 streams: Callable[[], dict[str, Any]] | None = None) -> list[Sample]:
    """The pump's counters (PumpStats), conversations in flight and, on Redis, its streams."""
    st = pump.stats
    org = (("organism", organism),)
    out = [
        Sample("xp_pump_info", "gauge", "The pump's organism and backend type.", 1,
               (("organism", organism), ("backend", backend_type))),
        Sample("xp_pump_messages_total", "counter", "Messages handled by a listener.", st.messages, org),
        Sample("xp_pump_outputs_total", "counter", "Messages sent to external receivers.", st.outputs, org),
        Sample("xp_pump_errors_total", "counter", "Error messages sent (handler errors, rejected messages).",
               st.errors, org),
        Sample("xp_pump_worker_tasks_total", "counter", "WorkerTasks submitted for cpu_bound listeners.",
               st.worker_tasks, org),
        Sample("xp_pump_conversations_total", "counter", "Conversations started.", st.conversations, org),
        Sample("xp_pump_redis_fallbacks_total", "counter",
               "Appends the pipelined Redis connection could not confirm, redone through the backend.",
               st.redis_fallbacks, org),
        Sample("xp_pump_conversations_in_flight", "gauge", "Conversations not finished yet.", pump.inflight, org),
    ]
    if streams is not None:
        for name, info in sorted(streams().items()):
            labels = (("organism", organism), ("stream", name))
            if "length" in info and info["length"] is not None:
                out.append(Sample("xp_stream_length", "gauge", "Entries in the organism's stream.",
                                  info["length"], labels))
            if info.get("pending") is not None:
                out.append(Sample("xp_stream_pending", "gauge",
                                  "Entries delivered to a consumer and not acknowledged yet.", info["pending"], labels))
    return out


class MetricsServer:
    """GET /metrics → render(collect()); anything else 404. `port=0` picks a free port (tests)."""

    def __init__(self, collect: Callable[[], Iterable[Sample]], port: int, host: str = "0.0.0.0") -> None:
        handler = _handler(collect)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="xp-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics at http://0.0.0.0:%d/metrics", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(collect: Callable[[], Iterable[Sample]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = render(collect()).encode()
            except Exception as e:  # noqa: BLE001 - a scrape reports trouble, it never kills the pump
                log.warning("metrics: could not collect: %s", e)
                self.send_error(503, f"could not collect metrics: {type(e).__name__}")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            return  # one line per scrape would drown the pump's log

    return Handler
