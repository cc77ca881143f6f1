"""The ``rayalign`` command line.

Each sub-command parses its arguments, builds components from ``actors``/``orchestrator``
and reports; no algorithm lives here. User errors (bad paths, configs, names) print one
line starting with ``error:`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("rayalign")


def _add_eval(subparsers) -> None:
    from orchestrator.config import SamplingConfig

    defaults = SamplingConfig()
    p = subparsers.add_parser("eval", help="score a model (optionally with a LoRA) on a prompt file")
    p.add_argument("--model", help="local diffusers pipeline directory: SD 1.x/2.x or SDXL (default: the embedded toy model)")
    p.add_argument("--lora", help="LoRA adapter: a training run directory (its latest checkpoint), a checkpoint directory, or an adapter directory")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line; or a built-in set: animals, toy-train, toy-heldout, toy-all")
    p.add_argument("--reward", required=True, action="append", help="reward name (repeat to sum several), NAME=WEIGHT, or module:function")
    p.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="option of a model or http reward, e.g. --reward-option aesthetic.weights=/models/aesthetic (repeatable; VALUE is YAML)")
    p.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its prompt (default 0)")
    p.add_argument("--output", required=True, help="JSON file for the scores; the image grid goes next to it as .png")
    p.add_argument("--steps", type=int, default=defaults.num_steps, help=f"DDIM steps (default {defaults.num_steps})")
    p.add_argument("--eta", type=float, default=defaults.eta, help=f"DDIM eta (default {defaults.eta})")
    p.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale, help=f"CFG weight (default {defaults.guidance_scale})")
    p.add_argument("--batch-size", type=int, default=32, help="images per sampling call (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(run=run_eval)


def _parse_reward_args(values: Sequence[str]) -> list[tuple[str, float]]:
    components = []
    for value in values:
        name, _, weight = value.partition("=")
        try:
            components.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"--reward {value!r}: weight {weight!r} is not a number; write NAME or NAME=WEIGHT") from None
    return components


def _parse_reward_options(values: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    from orchestrator.config import apply_overrides

    for value in values:
        key, sep, _ = value.partition("=")
        name = key.partition(".")[0]
        if not sep or "." not in key:
            raise ValueError(f"--reward-option {value!r} must look like NAME.KEY=VALUE, e.g. aesthetic.weights=/models/aesthetic")
        if name not in names:
            raise ValueError(f"--reward-option {value!r} is for reward {name!r}, which is not among the --reward names {list(names)}")
    return apply_overrides({}, values)


def run_eval(args: argparse.Namespace) -> int:
    from actors.prompts import read_prompts
    from actors.rewards import build_reward
    from orchestrator.config import SamplingConfig

    # Cheap checks first, so a typo fails before the model libraries are even imported.
    sampling = SamplingConfig(num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    components = _parse_reward_args(args.reward)
    reward = build_reward(components, options=_parse_reward_options(args.reward_option, [name for name, _ in components]))
    reward.check()
    prompts = read_prompts(args.prompts)
    output = Path(args.output)
    if output.suffix.lower() != ".json":
        raise ValueError(f"--output {args.output!r} must end in .json (the image grid is written next to it as .png)")
    if args.num_per_prompt < 1:
        raise ValueError(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")

    _quiet_library_progress()
    from actors.evaluate import evaluate
    from actors.images import make_grid, save_png
    from actors.policy import DiffusionPolicy
    from actors.toy_model import embedded_model_path
    from actors.policy import resolve_lora_dir

    model_path = args.model or embedded_model_path()
    lora = resolve_lora_dir(args.lora) if args.lora else None
    reward.load()  # a reward model that cannot load should fail before sampling starts
    logger.info("loading %s%s", model_path, f" + LoRA {lora}" if lora else "")
    if lora:
        policy = DiffusionPolicy.from_pretrained(model_path, finetune="lora", lora_path=lora, dtype=args.dtype, device=args.device)
        policy.merge_lora()  # eval only samples: fold the adapter in (float32 only; same images to rounding)
    else:
        policy = DiffusionPolicy.from_pretrained(model_path, finetune="full", dtype=args.dtype, device=args.device)
    logger.info("%d prompts x %d images, %d DDIM steps, guidance %.2f, reward %s", len(prompts), args.num_per_prompt, sampling.num_steps, sampling.guidance_scale, reward.name)
    result = evaluate(
        policy,
        prompts,
        reward,
        num_per_prompt=args.num_per_prompt,
        seed=args.seed,
        num_steps=sampling.num_steps,
        eta=sampling.eta,
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "mean": result.mean,
        "std": result.std,
        "per_prompt": result.per_prompt,
        "reward": reward.name,
        "info": result.info,
        "model": str(model_path),
        "lora": str(lora) if lora else None,
        "num_per_prompt": args.num_per_prompt,
        "seed": args.seed,
        "sampling": {"num_steps": sampling.num_steps, "eta": sampling.eta, "guidance_scale": sampling.guidance_scale},
        "images_per_second": result.images_per_second,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    grid = save_png(make_grid(result.images, columns=args.num_per_prompt), output.with_suffix(".png"))
    print(f"{reward.name}: mean {result.mean:.4f} (std {result.std:.4f}) over {len(prompts)} prompts x {args.num_per_prompt} images "
          f"[{result.images_per_second:.1f} images/s]")
    print(f"wrote {output} and {grid}")
    return 0


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="run (or resume) distributed DDPO/DPOK training")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a shipped config: toy-ddpo, toy-dpok, toy-compressibility, quickstart; on GPUs with your weights: sd15-aesthetic-ddpo, sd15-imagereward-dpok, sdxl-pickscore-grpo")
    source.add_argument("--config", help="a YAML config file")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config fields, e.g. --set train.epochs=5 learner.learning_rate=1e-4 (repeatable)")
    p.add_argument("--output-dir", required=True, help="run directory: config.yaml, metrics.jsonl, tensorboard/, images/, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last complete checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (summary lines only); the default when stderr is not a terminal (a Ray Job's log, a file)")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config, load_preset
    from orchestrator.metrics import read_metrics
    from orchestrator.run import train

    if args.preset:
        cfg = load_preset(args.preset, args.overrides)
    elif args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:
        raise ValueError("--set needs --preset or --config (on --resume, give the run's own --config to change train.epochs)")
    elif not args.resume:
        raise ValueError("give --preset NAME or --config FILE (or --resume to continue a run)")
    else:
        cfg = None
    output = train(cfg, args.output_dir, resume=args.resume, address=args.address, num_cpus=args.num_cpus, progress=not args.no_progress and sys.stderr.isatty())
    metrics = read_metrics(output)
    if metrics:
        last = metrics[-3:]
        print(f"reward/mean: epoch 1 {metrics[0]['reward/mean']:.4f} -> last {len(last)} epochs {sum(m['reward/mean'] for m in last) / len(last):.4f}")
    print(f"run written to {output}; evaluate with: {_eval_command(output)}")
    return 0


def _eval_command(output: Path) -> str:
    """The `rayalign eval` line that scores a run's LoRA on held-out prompts, sampled as the run sampled."""
    from orchestrator.config import Config, load_config

    cfg: Config = load_config(output / "config.yaml", [])
    model = f" --model {cfg.model.path}" if cfg.model.path else ""
    reward = " ".join(f"--reward {c.name}={c.weight:g}" if c.weight != 1 else f"--reward {c.name}" for c in cfg.reward.components)
    prompts = cfg.train.eval_prompts
    sampling = f"--steps {cfg.sampling.num_steps} --eta {cfg.sampling.eta:g} --guidance-scale {cfg.sampling.guidance_scale:g}"
    return f"rayalign eval{model} --lora {output} --prompts {prompts} {reward} {sampling} --output {output}/eval_heldout.json"


def _add_make_toy_model(subparsers) -> None:
    # Defaults live in actors.toy_pretrain.PretrainArgs; importing it here would load torch
    # for every command, so unset flags are left to it (the help text quotes its values).
    p = subparsers.add_parser("make-toy-model", help="pretrain the embedded toy text-to-image model from scratch")
    p.add_argument("--output", required=True, help="directory to write the pipeline to (must not exist or be empty)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--vae-steps", type=int, help="autoencoder steps (default 1000)")
    p.add_argument("--unet-steps", type=int, help="denoiser steps (default 500)")
    p.add_argument("--unet-lr-horizon", type=int, help="length of the denoiser's cosine LR schedule, at least --unet-steps (default 2600)")
    p.add_argument("--images-per-prompt", type=int, help="renders per training caption (default 80)")
    p.set_defaults(run=run_make_toy_model)


_PRETRAIN_FLAGS = ("seed", "vae_steps", "unet_steps", "unet_lr_horizon", "images_per_prompt")


def run_make_toy_model(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in _PRETRAIN_FLAGS if getattr(args, name) is not None}
    for name, value in given.items():
        if name == "unet_lr_horizon" and value < 0:
            raise ValueError(f"--unet-lr-horizon must be >= 0 (0 means --unet-steps), got {value}")
        if name not in ("seed", "unet_lr_horizon") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from actors.toy_pretrain import PretrainArgs, pretrain

    report = pretrain(PretrainArgs(output=args.output, **given))
    print(f"wrote toy pipeline to {args.output} in {report['time/total_s']:.0f}s "
          f"(reconstruction fidelity {report['vae/reconstruction_fidelity']:.3f}, denoiser loss {report['unet/final_loss']:.4f})")
    return 0


def _add_server_flags(p) -> None:
    """Flags that build a :class:`~orchestrator.config.ServeConfig` (shared by serve and bench serve)."""
    p.add_argument("--config", help="a YAML ServeConfig (limits, batching, scaling, ...); flags below override it")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override ServeConfig fields, e.g. --set limits.max_n=8 batching.max_batch_size=8 (repeatable)")
    p.add_argument("--model", help="local diffusers pipeline directory: SD 1.x/2.x or SDXL (default: the embedded toy model)")
    p.add_argument("--lora", help="LoRA to serve: a training run directory (its latest checkpoint), a checkpoint directory, or an adapter directory")
    p.add_argument("--replicas", type=int, help="number of replicas, each with a copy of the model (default 1)")
    p.add_argument("--max-batch-size", type=int, help="most images per denoising batch (default 16)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")


def _serve_config(args: argparse.Namespace):
    """The ServeConfig from --config, --set and the flags; errors name the dotted field."""
    from orchestrator.config import ServeConfig, from_dict, load_config, to_dict

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


def _check_serve_inputs(cfg):
    """Fail before Ray starts on a bad model or adapter.

    Returns the config with an absolute model path (replicas do not run in this
    directory) and the absolute adapter directory to serve, or None.
    """
    import dataclasses

    from actors.policy import check_pipeline_dir, read_lora, resolve_lora_dir

    if cfg.model is not None:
        cfg = dataclasses.replace(cfg, model=str(check_pipeline_dir(cfg.model).resolve()))
    if cfg.lora is None:
        return cfg, None
    lora = resolve_lora_dir(cfg.lora)
    read_lora(lora)
    return cfg, str(lora.resolve())


def _check_port(host: str, port: int) -> None:
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or --host") from None


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model (and a LoRA) over HTTP: OpenAI-compatible images API and a web page")
    _add_server_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $RAYALIGN_API_KEY; unset = no key)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="listen on a non-loopback --host without an API key")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="every SECONDS, look for a newer checkpoint under --lora and hot-swap it in (0 = off)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from jobs.serve_api import API_KEY_ENV

    cfg = _serve_config(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and not api_key and not args.allow_unauthenticated:
        raise ValueError(f"--host {args.host} makes the server reachable from other machines; set --api-key (or ${API_KEY_ENV}), "
                         "or pass --allow-unauthenticated to serve without one")
    if args.watch < 0:
        raise ValueError(f"--watch must be >= 0 seconds, got {args.watch}")
    if args.watch and cfg.lora is None:
        raise ValueError("--watch needs --lora (a training run directory whose new checkpoints to serve)")
    _check_port(args.host, args.port)
    _quiet_library_progress()
    cfg, lora = _check_serve_inputs(cfg)

    import signal

    from actors.image_generator import adapter_version
    from jobs.serve import deploy, model_id
    from orchestrator.run import connect

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (a service manager, `kill`) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, stop)
    connect(args.address, args.num_cpus)
    url = f"http://{args.host}:{args.port}"
    try:
        print(f"starting {cfg.scaling.num_replicas if not cfg.scaling.autoscale else 'autoscaled'} replica(s) of {model_id(cfg)}"
              f"{f' + LoRA {adapter_version(lora)}' if lora else ''} ...", flush=True)
        deploy(cfg, host=args.host, port=args.port, lora=lora, api_key=api_key, on_wait=lambda line: print(line, flush=True))
        print(f"serving at {url}  (web page: {url}/, API: POST {url}/v1/images/generations"
              f"{', API key required' if api_key else ''}); Ctrl-C to stop", flush=True)
        _serve_until_interrupted(cfg, args, lora=lora, api_key=api_key)
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down ...", file=sys.stderr, flush=True)
        _stop_serving(own_cluster=not (args.address or os.environ.get("RAY_ADDRESS")))
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _stop_serving(*, own_cluster: bool) -> None:
    """Remove the application; on a cluster this command started, stop Serve and Ray too.

    On a shared cluster (``--address``) only rayalign's application goes: Serve may be
    running other applications there.
    """
    import ray
    from ray import serve

    from jobs.serve import APP_NAME

    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as error:  # Ray may already be gone (its processes got the signal too)
        logger.warning("could not stop Serve cleanly: %s", error)
    ray.shutdown()


def _serve_until_interrupted(cfg, args: argparse.Namespace, *, lora: str | None, api_key: str | None) -> None:
    """Block until interrupted; with --watch, hot-swap each newer checkpoint of --lora."""
    import time

    from actors.image_generator import adapter_version
    from actors.policy import resolve_lora_dir
    from jobs.serve import deploy

    served = adapter_version(lora) if lora else None
    next_look = time.monotonic() + args.watch
    while True:
        time.sleep(0.5)
        if not args.watch or time.monotonic() < next_look:
            continue
        next_look = time.monotonic() + args.watch
        try:
            candidate = str(resolve_lora_dir(cfg.lora).resolve())
            version = adapter_version(candidate)
        except (ValueError, OSError) as error:
            logger.warning("--watch: cannot read %s (%s); still serving %s", cfg.lora, error, served)
            continue
        if version == served:
            continue
        print(f"new checkpoint {candidate} (version {version}); hot-swapping ...", flush=True)
        deploy(cfg, host=args.host, port=args.port, lora=candidate, api_key=api_key)
        served = version
        print(_swap_outcome(args.host, args.port, version=version, lora=candidate), flush=True)


def _swap_outcome(host: str, port: int, *, version: str, lora: str, timeout_s: float = 120) -> str:
    """What the server reports after a swap: the new version, or why it kept the old one."""
    import time
    import urllib.request

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


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: training sync vs async (default), or `bench serve`",
        description="Without a KIND: run one training preset in sync and then in async mode and compare them "
        "(samples/s, idle time per pool, overhead, weight sync, memory, reward). `bench serve`: load the image server.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help="training preset to run in both modes (toy-bench is sized for it)")
    source.add_argument("--config", help="a YAML training config instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per mode, the first one not timed (default 20)")
    p.add_argument("--output", help="write the report as JSON to this file")
    p.add_argument("--workdir", help="where the two runs are written (default: a new temporary directory)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.set_defaults(run=run_bench_train)
    kinds = p.add_subparsers(dest="bench", required=False, metavar="KIND")
    s = kinds.add_parser("serve", help="load the image server over loopback: latency percentiles, images/s, errors")
    _add_server_flags(s)
    s.add_argument("--concurrency", type=int, default=16, help="clients sending requests at once (default 16)")
    s.add_argument("--requests", type=int, default=200, help="requests per run, after the warm-up (default 200)")
    s.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default 20)")
    s.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    s.add_argument("--warmup", type=int, default=16, help="requests sent before each measured run, not counted (default 16)")
    s.add_argument("--url", help="load this running server (loopback only) instead of starting one")
    s.add_argument("--api-key", help="API key of --url (default: $RAYALIGN_API_KEY)")
    s.add_argument("--output", help="also write the results as JSON to this file")
    s.set_defaults(run=run_bench_serve)


def run_bench_train(args: argparse.Namespace) -> int:
    import tempfile

    from jobs.bench_train import bench_training, format_report
    from orchestrator.config import load_config, load_preset

    if not (args.preset or args.config):
        raise ValueError("give --preset NAME (e.g. toy-bench) or --config FILE to benchmark training, or use `rayalign bench serve ...`")
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() != ".json":
        raise ValueError(f"--output {args.output!r} must end in .json")
    cfg = load_preset(args.preset, args.overrides) if args.preset else load_config(args.config, args.overrides)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rayalign-bench-"))
    report = bench_training(cfg, epochs=args.epochs, workdir=workdir, address=args.address, num_cpus=args.num_cpus)
    report["workdir"] = str(workdir)
    print(format_report(report))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    print(f"runs written to {workdir}")
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    import os

    from jobs.bench import batching_summary, check_loopback, format_table, replica_stats, run_load
    from jobs.serve_api import API_KEY_ENV

    for name in ("concurrency", "requests", "steps", "n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() != ".json":
        raise ValueError(f"--output {args.output!r} must end in .json")

    def measure(url: str, name: str, api_key: str | None) -> dict:
        if args.warmup:
            run_load(url, concurrency=min(args.concurrency, args.warmup), requests=args.warmup, num_steps=args.steps, n=args.n, api_key=api_key)
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
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        report = {"concurrency": args.concurrency, "requests": args.requests, "steps": args.steps, "n": args.n, "runs": results}
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    return 0


def _bench_own_servers(args: argparse.Namespace, measure) -> dict:
    """Start the server twice on a free loopback port, with batching and with max_batch_size=1."""
    import dataclasses
    import socket

    cfg = _serve_config(args)
    _quiet_library_progress()
    cfg, lora = _check_serve_inputs(cfg)

    import os

    from ray import serve

    from jobs.serve import APP_NAME, deploy
    from orchestrator.run import connect

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    connect(args.address, args.num_cpus)
    results = {}
    try:
        for batch_size in dict.fromkeys((cfg.batching.max_batch_size, 1)):
            run_cfg = dataclasses.replace(cfg, batching=dataclasses.replace(cfg.batching, max_batch_size=batch_size))
            name = f"max_batch_size={batch_size}"
            print(f"[{name}] starting the server ...", flush=True)
            deploy(run_cfg, host="127.0.0.1", port=port, lora=lora, on_wait=lambda line: print(line, flush=True))
            results[name] = measure(f"http://127.0.0.1:{port}", name, None)
            serve.delete(APP_NAME)
    finally:
        _stop_serving(own_cluster=not (args.address or os.environ.get("RAY_ADDRESS")))
    return results


def _add_convert_reward(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-reward",
        help="convert a published reward checkpoint (pickle) to safetensors, once",
        description="Convert a published reward checkpoint to a safetensors directory that a reward's `weights` option can "
        "point at. Pickles are read with torch.load(weights_only=True), which refuses anything but tensors.",
    )
    p.add_argument("kind", choices=["aesthetic", "clip", "hpsv2", "imagereward"],
                   help="aesthetic: sac+logos+ava1-l14-linearMSE.pth; clip: a Hugging Face CLIP directory with pytorch_model.bin "
                   "(e.g. PickScore_v1); hpsv2: HPS_v2*.pt; imagereward: ImageReward.pt")
    p.add_argument("--input", required=True, help="the checkpoint file (a directory for kind clip)")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--tokenizer", help="hpsv2: a CLIP tokenizer directory; imagereward: the bert-base-uncased tokenizer directory")
    p.add_argument("--vision-heads", type=int, help="attention heads of the image tower, if not the usual for its width")
    p.add_argument("--text-heads", type=int, help="attention heads of the text tower, if not width / 64")
    p.set_defaults(run=run_convert_reward)


def run_convert_reward(args: argparse.Namespace) -> int:
    for flag in ("vision_heads", "text_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    _quiet_library_progress()
    from actors.reward_convert import convert_reward

    output = convert_reward(args.kind, source=args.input, output=args.output, tokenizer=args.tokenizer, vision_heads=args.vision_heads, text_heads=args.text_heads)
    print(f"wrote {output}; use it as the `weights` option of the {args.kind if args.kind != 'clip' else 'clip_score or pickscore'} reward")
    return 0


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune hyperparameter sweep: each trial a full training run, ASHA on reward/mean")
    p.add_argument("--config", required=True, help="sweep YAML: base preset or config, search_space, num_samples, scheduler (see README)")
    p.add_argument("--output-dir", required=True, help="sweep directory: trials/, tune/, results.csv, results.parquet, best_config.yaml, best_checkpoint.txt")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --output-dir (finished trials are kept)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from jobs.sweep import load_sweep, sweep

    return sweep(load_sweep(args.config), args.output_dir, resume=args.resume, address=args.address, num_cpus=args.num_cpus)


def _add_submit(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run a rayalign command as a Ray Job on a cluster and follow its logs",
        description="Submit `rayalign ARGS` as a Ray Job, print its id, follow its logs and exit with its outcome "
        "(0 succeeded, 1 failed or stopped). The cluster's auth token is read from $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
    )
    p.add_argument("--address", help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", help="directory uploaded as the job's working directory (files in .gitignore are left out)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable)")
    p.add_argument("--submission-id", help="the job's id (default: generated by Ray)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted instead of following it")
    p.add_argument("rayalign_args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the rayalign command the job runs, e.g. -- train --preset toy-ddpo --output-dir /runs/r1")
    p.set_defaults(run=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    import os

    from jobs.submit import submit

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("give --address http://HEAD:8265 (the dashboard URL) or set RAY_ADDRESS")
    return submit(address=address, rayalign_args=args.rayalign_args, working_dir=args.working_dir, env=args.env,
                  submission_id=args.submission_id, wait=not args.no_wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayalign", description="Align text-to-image diffusion models with RL on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_make_toy_model(subparsers)
    _add_serve(subparsers)
    _add_bench(subparsers)
    _add_convert_reward(subparsers)
    _add_sweep(subparsers)
    _add_submit(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_library_progress() -> None:
    """Loading a few small files should not print "Loading weights" bars."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
