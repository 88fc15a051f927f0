"""A small HTTP service that asks the organism "shop" and shows a thread, as a client pod runs it.

    POST /greet?name=Ada      -> sends <greet name="Ada"/> to the listener "greeter", returns the answer
    GET  /threads/<id>        -> the thread's slots (verified with the signing key)

Configuration comes from the pod: the XP_* environment the operator's webhook injects (or the mounted
Service Binding); nothing here names a host, a user or a password.
"""
from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import quoteattr

from xml_pipeline.client import NoAnswer, OrganismClient
from xml_pipeline.message_bus.message import Message

CLIENT = OrganismClient()


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path != "/greet":
            return self._send(404, {"error": "POST /greet?name=..."})
        name = parse_qs(url.query).get("name", ["world"])[0][:100]
        message = Message(sender="frontend", to="greeter", payload=f"<greet name={quoteattr(name)}/>")
        try:
            answer = CLIENT.request(message, timeout=10)
        except NoAnswer as e:
            return self._send(504, {"error": str(e)})
        return self._send(200, {"thread": answer.thread, "answer": answer.payload})

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "threads":
            return self._send(404, {"error": "GET /threads/<id>"})
        slots = CLIENT.read_thread(parts[1])
        return self._send(200, [{"from": s.from_id, "to": s.to_id, "payload": str(s.payload)} for s in slots])


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
