"""``rayalign serve``: start the image server on Ray Serve, follow a training run, stop on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.request

import ray
from ray import serve

from actors.diffusion.files import check_pipeline_dir
from actors.diffusion.generator import adapter_version
from actors.diffusion.lora import read_lora
from actors.storage import Location
from actors.toy.model import resolve_model_path
from jobs.console import quiet_library_progress
from jobs.sampling import ChosenSampling
from jobs.serve.api import API_KEY_ENV
from jobs.serve.app import APP_NAME, deploy, model_id, serve_sampling, with_trained_model
from orchestrator.cluster import connect
from orchestrator.config import ServeConfig, from_dict, load_config, replace, to_dict
from orchestrator.rundir import locate_lora, lora_choice, resolve_lora_dir, resolve_model

logger = logging.getLogger("rayalign")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig from --config, --set and the flags; errors name the dotted field."""
    data = to_dict(load_config(args.config, args.overrides, cls=ServeConfig))
    if args.model is not None:
        data["model"] = args.model
    if args.lora is not None:
        data["lora"] = args.lora
    if args.replicas is not None:
        data["scaling"]["num_replicas"] = args.replicas
    if args.max_batch_size is not None:
        data["batching"]["max_batch_size"] = args.max_batch_size
    return from_dict(ServeConfig, data)


def check_serve_inputs(cfg: ServeConfig) -> tuple[ServeConfig, str | None]:
    """Fail before Ray starts on a bad model or adapter.

    Returns the config with the model as replicas must name it (an absolute path: they do not
    run in this directory; a URI as it is) and the adapter to serve (the exact checkpoint's
    adapter, so every replica serves the same one), or None.
    """
    cfg = with_trained_model(cfg)  # no model: the one the adapter was trained on
    if cfg.model is not None:
        base, _ = resolve_model(cfg.model)
        check_pipeline_dir(base)
        cfg = replace(cfg, model=Location(resolve_model_path(cfg.model)).uri)
    if cfg.lora is None:
        return cfg, None
    adapter, chosen = lora_choice(cfg.lora)
    read_lora(resolve_lora_dir(adapter.uri))
    print(f"adapter: {chosen}", flush=True)  # a run's best checkpoint, or its latest
    return cfg, adapter.uri


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or --host") from None


def run(args: argparse.Namespace) -> int:
    cfg = serve_config(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and not api_key and not args.allow_unauthenticated:
        raise ValueError(
            f"--host {args.host} makes the server reachable from other machines; set --api-key (or ${API_KEY_ENV}), "
            "or pass --allow-unauthenticated to serve without one"
        )
    if args.watch < 0:
        raise ValueError(f"--watch must be >= 0 seconds, got {args.watch}")
    if args.watch and cfg.lora is None:
        raise ValueError("--watch needs --lora (a training run directory whose new checkpoints to serve)")
    _check_port(args.host, args.port)
    quiet_library_progress()
    cfg, lora = check_serve_inputs(cfg)
    local = resolve_lora_dir(lora) if lora else None  # this node's copy (a URI's adapter is downloaded once)
    sampling = serve_sampling(cfg, local)  # before Ray starts: an adapter trained outside the limits fails here
    _report_serve_sampling(sampling)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (a service manager, `kill`) shuts down as cleanly as Ctrl-C. SIGINT is set too: a process
    # started in the background by a shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    connect(args.address, args.num_cpus)
    url = f"http://{args.host}:{args.port}"
    try:
        print(
            f"starting {cfg.scaling.num_replicas if not cfg.scaling.autoscale else 'autoscaled'} replica(s) of {model_id(cfg)}"
            f"{f' + LoRA {adapter_version(local)}' if local else ''} ...",
            flush=True,
        )
        deploy(cfg, host=args.host, port=args.port, lora=lora, api_key=api_key, on_wait=lambda line: print(line, flush=True))
        print(
            f"serving at {url}  (web page: {url}/, API: POST {url}/v1/images/generations"
            f"{', API key required' if api_key else ''}); Ctrl-C to stop",
            flush=True,
        )
        _serve_until_interrupted(cfg, args, lora=lora, api_key=api_key)
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down ...", file=sys.stderr, flush=True)
        stop_serving(own_cluster=not (args.address or os.environ.get("RAY_ADDRESS")))
    print("stopped", file=sys.stderr, flush=True)
    return 0


def stop_serving(*, own_cluster: bool) -> None:
    """Remove the application; on a cluster this command started, stop Serve and Ray too.

    On a shared cluster (``--address``) only rayalign's application goes: Serve may be
    running other applications there.
    """
    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as error:  # Ray may already be gone (its processes got the signal too)
        logger.warning("could not stop Serve cleanly: %s", error)
    ray.shutdown()


def _report_serve_sampling(sampling: ChosenSampling, previous: ChosenSampling | None = None) -> None:
    """Print the request defaults, and once per adapter each setting of the config that differs from its training."""
    if previous is not None and (previous.settings, previous.differences) == (sampling.settings, sampling.differences):
        return
    print(f"requests without sampling fields use {sampling.settings.describe()} ({sampling.origin()})", flush=True)
    for line in sampling.differences:
        print(f"warning: {line}", file=sys.stderr, flush=True)


def _serve_until_interrupted(cfg, args: argparse.Namespace, *, lora: str | None, api_key: str | None) -> None:
    """Block until interrupted; with --watch, hot-swap each newer checkpoint of --lora."""
    local = resolve_lora_dir(lora) if lora else None
    served = adapter_version(local) if local else None
    sampling = serve_sampling(cfg, local)
    next_look = time.monotonic() + args.watch
    while True:
        time.sleep(0.5)
        if not args.watch or time.monotonic() < next_look:
            continue
        next_look = time.monotonic() + args.watch
        try:
            candidate = locate_lora(cfg.lora).uri  # replicas fetch it themselves, wherever they run
            local = resolve_lora_dir(candidate)
            version = adapter_version(local)
            new_sampling = serve_sampling(cfg, local) if version != served else sampling
        except (ValueError, OSError) as error:
            logger.warning("--watch: cannot read %s (%s); still serving %s", cfg.lora, error, served)
            continue
        if version == served:
            continue
        print(f"new checkpoint {candidate} (version {version}); hot-swapping ...", flush=True)
        _report_serve_sampling(new_sampling, sampling)
        deploy(cfg, host=args.host, port=args.port, lora=candidate, api_key=api_key)
        served, sampling = version, new_sampling
        print(_swap_outcome(args.host, args.port, version=version, lora=candidate), flush=True)


def _swap_outcome(host: str, port: int, *, version: str, lora: str, timeout_s: float = 120) -> str:
    """What the server reports after a swap: the new version, or why it kept the old one."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                health = json.loads(response.read())
        except (OSError, ValueError):
            health = {}
        if health.get("adapter_version") == version:
            return f"now serving {version}"
        failure = health.get("adapter_error") or {}
        if failure.get("lora") == lora:
            return f"hot swap failed, still serving {health.get('adapter_version') or 'the base model'}: {failure.get('message')}"
        time.sleep(0.5)
    return f"the server has not confirmed the swap to {version} within {timeout_s:.0f} s; see /healthz"
