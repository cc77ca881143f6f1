"""A real scoring service for the ``http`` reward: stdlib ``http.server`` in a thread.

It speaks the protocol of :mod:`actors.rewards.http` and scores each image by its mean
brightness in [0, 1]. ``script`` lets a test make it misbehave for the next requests
(slow, garbage, wrong count, HTTP errors) to exercise timeouts, retries and validation.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jobs.bench.judge import brightness


class ScoringServer:
    """Start with ``with ScoringServer() as server:``; ``server.url`` is the endpoint."""

    def __init__(self, *, token: str | None = None):
        self.token = token
        self.requests: list[dict] = []
        """Decoded JSON bodies received, in order."""
        self.headers: list[dict[str, str]] = []
        self.script: list[str] = []
        """Behaviours for the next requests, consumed one per request: "ok", "slow", "garbage",
        "short", "nan", "no_scores", "503", "404", "bad_info"; empty = "ok"."""
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    mode = server.script.pop(0) if server.script else "ok"
                if server.token is not None and self.headers.get("Authorization") != server.token:
                    return self._send(401, b'{"error": "bad token"}')
                if mode in ("503", "404"):
                    return self._send(int(mode), b"scripted failure")
                if mode == "slow":
                    time.sleep(1.0)
                scores = [brightness(image) for image in body["images"]]
                answer: object = {"scores": scores, "info": {"judge_ms": 1.5}}
                if mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                if mode == "short":
                    answer = {"scores": scores[:-1]}
                if mode == "nan":
                    answer = {"scores": [float("nan")] + scores[1:]}
                if mode == "no_scores":
                    answer = {"result": scores}
                if mode == "bad_info":
                    answer = {"scores": scores, "info": {"verdict": "good"}}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        # A short poll interval makes shutdown (one per test) quick.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "ScoringServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
