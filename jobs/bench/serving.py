"""``rayalign bench serve``: drive the image server over loopback and measure it.

A bounded, closed-loop load: ``concurrency`` clients each send one request, wait for its
answer and send the next, until ``requests`` requests have been answered. It reports
latency percentiles, images per second and errors by kind. With no ``--url`` the bench
starts the server itself, once with batching on and once with ``max_batch_size=1``, so
the two runs differ only in batching.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import itertools
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
from ray import serve

from actors.toy import world as toy_world
from jobs.bench import json_output, write_report
from jobs.console import quiet_library_progress
from jobs.serve.api import API_KEY_ENV
from jobs.serve.app import APP_NAME, deploy
from jobs.serve.command import check_serve_inputs, serve_config, stop_serving
from orchestrator.cluster import connect
from orchestrator.config import replace

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One answered (or failed) request."""

    status: int
    """HTTP status; 0 when no HTTP answer came (connection refused, reset, timed out)."""
    seconds: float
    images: int


def summarize(outcomes: Sequence[Outcome], *, wall_seconds: float) -> dict[str, Any]:
    """Latency percentiles (of successful requests), throughput and error counts."""
    ok = [o for o in outcomes if o.status == 200]
    latencies = np.array([o.seconds for o in ok], dtype=np.float64)

    def percentile(q: float) -> float | None:
        return float(np.percentile(latencies, q)) if len(latencies) else None

    images = sum(o.images for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors_4xx": sum(1 for o in outcomes if 400 <= o.status < 500),
        "errors_5xx": sum(1 for o in outcomes if o.status >= 500),
        "errors_connection": sum(1 for o in outcomes if o.status == 0),
        "images": images,
        "seconds": wall_seconds,
        "images_per_s": images / wall_seconds if wall_seconds > 0 else 0.0,
        "latency_p50_s": percentile(50),
        "latency_p95_s": percentile(95),
        "latency_p99_s": percentile(99),
    }


def check_loopback(url: str) -> tuple[str, int]:
    """(host, port) of ``url``; the bench only ever loads this machine."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"--url {url!r} must look like http://127.0.0.1:8000")
    if parts.hostname not in LOOPBACK_HOSTS and not parts.hostname.startswith("127."):
        raise ValueError(f"--url {url!r}: the bench sends load only to this machine (127.0.0.0/8, localhost or ::1)")
    return parts.hostname, parts.port or 80


def run_load(
    url: str,
    *,
    concurrency: int,
    requests: int,
    num_steps: int = 20,
    n: int = 1,
    api_key: str | None = None,
    timeout_s: float = 300,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Send ``requests`` image requests from ``concurrency`` closed-loop clients; summarize."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    if requests < 1:
        raise ValueError(f"--requests must be >= 1, got {requests}")
    host, port = check_loopback(url)
    prompts = toy_world.train_prompts() + toy_world.held_out_prompts()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    counter = itertools.count()
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    index = next(counter)
                if index >= requests:
                    return
                body = json.dumps(
                    {"prompt": prompts[index % len(prompts)], "n": n, "seed": index, "num_inference_steps": num_steps}
                ).encode()
                started = time.perf_counter()
                try:
                    connection.request("POST", "/v1/images/generations", body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    status = response.status
                    images = len(json.loads(payload).get("data", [])) if status == 200 else 0
                except (OSError, http.client.HTTPException, ValueError):
                    connection.close()
                    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
                    status, images = 0, 0
                outcome = Outcome(status=status, seconds=time.perf_counter() - started, images=images)
                with lock:
                    outcomes.append(outcome)
                    done = len(outcomes)
                if progress is not None:
                    progress(done, requests)
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client") as pool:
        for future in [pool.submit(client) for _ in range(min(concurrency, requests))]:
            future.result()
    return summarize(outcomes, wall_seconds=time.perf_counter() - started)


def replica_stats(url: str) -> dict[str, Any] | None:
    """``/healthz`` of the replica that answers: its id and batching counters (None if unreadable)."""
    host, port = check_loopback(url)
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        health = json.loads(connection.getresponse().read())
        return {"replica": health["replica"], **health["stats"]}
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None
    finally:
        connection.close()


def batching_summary(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Mean real images per denoising batch and the share of padding, between two readings
    of one replica's counters; empty when they come from different replicas."""
    if not before or not after or before["replica"] != after["replica"] or after["batches"] <= before["batches"]:
        return {}
    batches = after["batches"] - before["batches"]
    images = after["images"] - before["images"]
    padding = after["padding"] - before["padding"]
    return {"mean_batch": images / batches, "padding_fraction": padding / (images + padding) if images + padding else 0.0}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per run: latency percentiles, throughput, errors."""

    def seconds(value: float | None) -> str:
        return f"{value:7.3f}" if value is not None else "      -"

    lines = [f"{'run':<24} {'ok':>5} {'4xx':>4} {'5xx':>4} {'conn':>4} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'images/s':>9} {'batch':>6}"]
    for name, r in results.items():
        batch = f"{r['mean_batch']:>6.1f}" if r.get("mean_batch") is not None else f"{'-':>6}"
        lines.append(
            f"{name:<24} {r['ok']:>5} {r['errors_4xx']:>4} {r['errors_5xx']:>4} {r['errors_connection']:>4} "
            f"{seconds(r['latency_p50_s'])} {seconds(r['latency_p95_s'])} {seconds(r['latency_p99_s'])} {r['images_per_s']:>9.2f} {batch}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``rayalign bench serve``: load a running server, or this machine's own servers with and without batching."""
    for name in ("concurrency", "requests", "steps", "n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    output = json_output(args.output)

    def measure(url: str, name: str, api_key: str | None) -> dict:
        if args.warmup:
            run_load(
                url, concurrency=min(args.concurrency, args.warmup), requests=args.warmup, num_steps=args.steps, n=args.n, api_key=api_key
            )
        print(f"[{name}] {args.requests} requests from {args.concurrency} clients ...", flush=True)
        before = replica_stats(url)
        result = run_load(url, concurrency=args.concurrency, requests=args.requests, num_steps=args.steps, n=args.n, api_key=api_key)
        return {**result, **batching_summary(before, replica_stats(url))}

    if args.url:
        check_loopback(args.url)
        results = {"server": measure(args.url, "server", args.api_key or os.environ.get(API_KEY_ENV))}
    else:
        results = _bench_own_servers(args, measure)
    print(format_table(results))
    if len(results) == 2:
        batched, single = results.values()
        if single["images_per_s"] > 0:
            print(f"batching speed-up: {batched['images_per_s'] / single['images_per_s']:.2f}x images/s")
    write_report(output, {"concurrency": args.concurrency, "requests": args.requests, "steps": args.steps, "n": args.n, "runs": results})
    return 0


def _bench_own_servers(args: argparse.Namespace, measure) -> dict:
    """Start the server twice on a free loopback port, with batching and with max_batch_size=1."""
    cfg = serve_config(args)
    quiet_library_progress()
    cfg, lora = check_serve_inputs(cfg)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    connect(args.address, args.num_cpus)
    results = {}
    try:
        for batch_size in dict.fromkeys((cfg.batching.max_batch_size, 1)):
            run_cfg = replace(cfg, batching=replace(cfg.batching, max_batch_size=batch_size))
            name = f"max_batch_size={batch_size}"
            print(f"[{name}] starting the server ...", flush=True)
            deploy(run_cfg, host="127.0.0.1", port=port, lora=lora, on_wait=lambda line: print(line, flush=True))
            results[name] = measure(f"http://127.0.0.1:{port}", name, None)
            serve.delete(APP_NAME)
    finally:
        stop_serving(own_cluster=not (args.address or os.environ.get("RAY_ADDRESS")))
    return results
