"""The ``rayalign`` command line: the flags of every sub-command, and the dispatch to its module.

Each sub-command is a module of :mod:`jobs` with a ``run(args)`` function (``rayalign
eval`` is :mod:`jobs.eval`, ``rayalign serve`` is :mod:`jobs.serve.command`, ...); this
module only parses. The command's module is imported after parsing, so ``rayalign
--help`` and a mistyped flag answer at once instead of after loading torch and Ray.

User errors (bad paths, configs, names) print one line starting with ``error:`` and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from orchestrator.config import SamplingConfig

LOGGER_HELP = (
    "experiment tracker of the metrics, config and image grids: tensorboard, wandb, mlflow, or none for metrics.jsonl only "
    "(repeatable; default tensorboard); wandb and mlflow read their usual variables, e.g. WANDB_MODE=offline, "
    "MLFLOW_TRACKING_URI (default: a SQLite store in the run directory)"
)

MODEL_HELP = (
    "local diffusers pipeline directory (SD 1.x/2.x, SDXL or SD3) or an embedded model, toy-t2i or toy-sd3 "
    "(default: the model the --lora adapter was trained on, else toy-t2i)"
)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="run (or resume) distributed DDPO/DPOK training")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        help="a shipped config: toy-ddpo, toy-dpok, toy-compressibility, toy-flow-grpo, quickstart; "
        "on GPUs with your weights: sd15-aesthetic-ddpo, sd15-imagereward-dpok, sdxl-pickscore-grpo, sd35m-pickscore-grpo, "
        "flux-dev-hpsv2-grpo",
    )
    source.add_argument("--config", help="a YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set train.epochs=5 learner.learning_rate=1e-4 (repeatable)",
    )
    p.add_argument(
        "--output-dir",
        required=True,
        help="run directory, local or in object storage (s3://bucket/run, gs://...): config.yaml, metrics.jsonl, tensorboard/, "
        "images/, checkpoints/",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last complete checkpoint (with nothing to resume there, start it)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (summary lines only); the default when stderr is not a terminal (a Ray Job's log, a file)",
    )
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with a local cluster (off by default: it costs seconds)")
    p.add_argument("--logger", dest="loggers", action="append", metavar="NAME", help=LOGGER_HELP)
    p.set_defaults(module="jobs.train")


def _add_eval(subparsers) -> None:
    defaults = SamplingConfig()
    p = subparsers.add_parser("eval", help="score a model (optionally with a LoRA) on a prompt file")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--lora", help="LoRA adapter: a run directory (its checkpoints/best, else its latest), a checkpoint, or an adapter directory"
    )
    p.add_argument(
        "--prompts", required=True, help="text file, one prompt per line; or a built-in set: animals, toy-train, toy-heldout, toy-all"
    )
    p.add_argument("--reward", required=True, action="append", help="reward name (repeat to sum several), NAME=WEIGHT, or module:function")
    p.add_argument(
        "--reward-option",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="option of a model or http reward, e.g. --reward-option aesthetic.weights=/models/aesthetic (repeatable; VALUE is YAML)",
    )
    p.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its prompt (default 0)")
    p.add_argument("--output", required=True, help="JSON file for the scores; the image grid goes next to it as .png")
    trained = "default: what the --lora run was trained with, else"
    p.add_argument("--steps", type=int, help=f"denoising steps ({trained} {defaults.num_steps})")
    p.add_argument("--eta", type=float, help=f"per-step noise: DDIM eta, SD3's SDE noise level ({trained} {defaults.eta:g})")
    p.add_argument("--guidance-scale", type=float, help=f"CFG weight, 1 = no guidance ({trained} {defaults.guidance_scale:g})")
    p.add_argument(
        "--sde-window",
        metavar="START,STOP|none",
        help="flow models: the SDE on steps START..STOP-1 and the ODE step on the others, or none for the SDE on every step "
        "(default: the --lora run's sampling.sde_window while --steps is its number of steps, else none)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per sampling call (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(module="jobs.eval")


def _add_make_toy_model(subparsers) -> None:
    # Defaults live in actors.toy.pretrain.PretrainArgs and actors.toy.flow_pretrain.FlowPretrainArgs;
    # importing them here would load torch for every command, so unset flags are left to them
    # (the help text quotes their values).
    p = subparsers.add_parser("make-toy-model", help="pretrain an embedded toy text-to-image model from scratch")
    p.add_argument("--output", required=True, help="directory to write the pipeline to (must not exist or be empty)")
    p.add_argument(
        "--family",
        choices=["sd", "sd3"],
        default="sd",
        help="sd: the SD 1.5-format UNet model (toy-t2i); sd3: the SD 3.5-format flow model (toy-sd3) (default sd)",
    )
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--images-per-prompt", type=int, help="renders per training caption (default 80)")
    p.add_argument("--vae-steps", type=int, help="sd: autoencoder steps (default 1000)")
    p.add_argument("--unet-steps", type=int, help="sd: denoiser steps (default 500)")
    p.add_argument("--unet-lr-horizon", type=int, help="sd: length of the denoiser's LR schedule, at least --unet-steps (default 2600)")
    p.add_argument("--steps", type=int, help="sd3: transformer steps (default 240)")
    p.add_argument("--lr-horizon", type=int, help="sd3: length of the cosine LR schedule, at least --steps (default 3000)")
    p.set_defaults(module="jobs.make_toy_model")


def _add_server_flags(p) -> None:
    """Flags that build a :class:`~orchestrator.config.ServeConfig` (shared by serve and bench serve)."""
    p.add_argument("--config", help="a YAML ServeConfig (limits, batching, scaling, ...); flags below override it")
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override ServeConfig fields, e.g. --set limits.max_n=8 batching.max_batch_size=8 (repeatable)",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--lora", help="LoRA to serve: a run directory (its checkpoints/best, else its latest), a checkpoint, or an adapter directory"
    )
    p.add_argument("--replicas", type=int, help="number of replicas, each with a copy of the model (default 1)")
    p.add_argument("--max-batch-size", type=int, help="most images per denoising batch (default 16)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model (and a LoRA) over HTTP: OpenAI-compatible images API and a web page")
    _add_server_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $RAYALIGN_API_KEY; unset = no key)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="listen on a non-loopback --host without an API key")
    p.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="every SECONDS, look for a newer checkpoint under --lora and hot-swap it in (0 = off)",
    )
    p.set_defaults(module="jobs.serve.command")


def _add_bench_run(p: argparse.ArgumentParser, *, runs: str, workdir: str) -> None:
    """The flags of a training benchmark: what it runs, where its runs go and where its report goes."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"training preset to run {runs} (toy-bench is sized for it)")
    source.add_argument("--config", help="a YAML training config instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--output", help="write the report as JSON to this file")
    p.add_argument("--workdir", help=f"where {workdir} are written (default: a new temporary directory)")


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: training sync vs async (default), `bench scaling` or `bench serve`",
        description="Without a KIND: run one training preset in sync and then in async mode and compare them "
        "(samples/s, idle time per pool, overhead, weight sync, memory, reward). `bench serve`: load the image server.",
    )
    _add_bench_run(p, runs="in both modes", workdir="the two runs")
    p.add_argument("--epochs", type=int, default=20, help="epochs per mode, the first one not timed (default 20)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.set_defaults(module="jobs.bench.training")
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
    s.set_defaults(module="jobs.bench.serving")
    c = kinds.add_parser("scaling", help="the same preset with 1, 2, 4, ... rollout actors: samples/s and each actor's idle time")
    _add_bench_run(c, runs="at every size", workdir="the runs")
    c.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4], help="rollout pool sizes to run (default 1 2 4)")
    c.add_argument("--epochs", type=int, default=6, help="epochs per size, the first one not timed (default 6)")
    c.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    c.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    c.set_defaults(module="jobs.bench.scaling")
    f = kinds.add_parser(
        "faults",
        help="kill actors and a learner, break the reward: does each short run recover as if nothing happened?",
        description="Runs the preset undisturbed, then once per fault (rollout, reward and reference actors killed, the "
        "rollout actor's node removed, a learner killed mid-update and mid-checkpoint, the driver killed then resumed, the "
        "HTTP judge down for a while, checkpoint storage refusing writes, a reward returning NaN under both "
        "reward.on_invalid policies) on a multi-node Ray cluster it starts on this machine (it kills real processes), and "
        "tabulates recovery, seconds lost, samples lost "
        "or duplicated and whether the final weights equal the undisturbed run's. Exits 1 if a fault was not recovered.",
    )
    _add_bench_run(f, runs="undisturbed and once per fault", workdir="the runs")
    f.add_argument("--epochs", type=int, default=3, help="epochs per run, with a checkpoint after each (default 3)")
    f.add_argument("--only", nargs="+", default=[], metavar="WORD", help="run only the faults whose name contains one of these words")
    f.add_argument("--nodes", type=int, default=3, help="Ray nodes of the cluster it starts on this machine (default 3)")
    f.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of each node (default 4)")
    f.add_argument("--async", dest="asynchronous", action="store_true", help="run the matrix in async mode (train.mode: async)")
    f.add_argument("--judge-down-s", type=float, default=30.0, help="how long the HTTP judge stays down (default 30)")
    f.set_defaults(module="jobs.bench.faults")


def _add_convert_reward(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-reward",
        help="convert a published reward checkpoint (pickle) to safetensors, once",
        description="Convert a published reward checkpoint to a safetensors directory that a reward's `weights` option can "
        "point at. Pickles are read with torch.load(weights_only=True), which refuses anything but tensors.",
    )
    p.add_argument(
        "kind",
        choices=["aesthetic", "clip", "hpsv2", "imagereward"],
        help="aesthetic: sac+logos+ava1-l14-linearMSE.pth; clip: a Hugging Face CLIP directory with pytorch_model.bin "
        "(e.g. PickScore_v1); hpsv2: HPS_v2*.pt; imagereward: ImageReward.pt",
    )
    p.add_argument("--input", required=True, help="the checkpoint file (a directory for kind clip)")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--tokenizer", help="hpsv2: a CLIP tokenizer directory; imagereward: the bert-base-uncased tokenizer directory")
    p.add_argument("--vision-heads", type=int, help="attention heads of the image tower, if not the usual for its width")
    p.add_argument("--text-heads", type=int, help="attention heads of the text tower, if not width / 64")
    p.set_defaults(module="jobs.convert_reward")


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune hyperparameter sweep: each trial a full training run, ASHA on reward/mean")
    p.add_argument(
        "--config", required=True, help="sweep YAML: base preset or config, search_space, num_samples, scheduler (see docs/cluster.md)"
    )
    p.add_argument(
        "--output-dir",
        required=True,
        help="sweep directory: trials/, tune/, results.csv, results.parquet, best_config.yaml, best_checkpoint.txt",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --output-dir (finished trials are kept)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local cluster (default: max(8, cores))")
    p.add_argument("--logger", dest="loggers", action="append", metavar="NAME", help=f"{LOGGER_HELP}; each trial logs its own run")
    p.set_defaults(module="jobs.sweep")


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
    p.add_argument(
        "rayalign_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="the rayalign command the job runs, e.g. -- train --preset toy-ddpo --output-dir /runs/r1",
    )
    p.set_defaults(module="jobs.submit")


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page of a run's (or a sweep's) curves, image grids and config",
        description="Plot a run's metrics.jsonl (reward and its components, gold and held-out rewards, KL, clipping, IS "
        "ratio, ESS and staleness, time per pool, samples/s, learning rate), show its image grids and config, in one "
        "HTML file that opens offline. Several runs, or a sweep's trials, are drawn on the same axes.",
    )
    p.add_argument("run", help="a run directory (--output-dir of `rayalign train`) or a sweep directory, local or a URI")
    p.add_argument(
        "--compare", nargs="+", default=[], metavar="RUN", help="more runs (or sweeps) to draw on the same axes, each named in the legend"
    )
    p.add_argument("--output", help="the HTML file to write, a path or a URI (default: RUN/report.html; required for a URI run)")
    p.add_argument("--max-grids", type=int, default=6, help="most image grids per run, evenly spread, first and last kept (default 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the default when stderr is not a terminal)")
    p.set_defaults(module="jobs.report.command")


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
    _add_report(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        command = importlib.import_module(args.module)  # only the chosen command's libraries are loaded
        return command.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
