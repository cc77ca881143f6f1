"""A small scoring service for the ``http`` reward, as its own process: each image scores its mean brightness.

The fault matrix runs one to stop it (SIGKILL) in the middle of a run and start it again
on the same port; it is also a starting point for a judge of one's own, since it speaks
the whole protocol of :mod:`actors.rewards.http`::

    python -m jobs.bench.judge --port 8500     # then reward: {name: http, options: {url: http://127.0.0.1:8500/score}}
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def decode_png(text: str) -> np.ndarray:
    """An (H, W, 3) uint8 image from the protocol's base64 PNG."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def brightness(text: str) -> float:
    """Mean pixel value of a base64 PNG, in [0, 1]: the score."""
    return float(decode_png(text).astype(np.float64).mean() / 255.0)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # a health check
        self._send(200, b'{"ok": true}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, json.dumps({"scores": [brightness(image) for image in body["images"]]}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Judge:
    """``python -m jobs.bench.judge`` as a child process on ``port`` of this machine's loopback."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/score"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> Judge:
        self.process = subprocess.Popen([sys.executable, "-m", "jobs.bench.judge", "--port", str(self.port)])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the judge did not start on port {self.port}") from None
                time.sleep(0.1)

    def kill(self) -> int:
        """SIGKILL the judge's process; returns its pid."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return self.process.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
