"""Start a training run: check the config against the cluster, launch the learner group, report.

This is what ``rayalign train`` calls. The driver process does no ML: it connects to
Ray, checks that every pool fits, creates the :class:`~orchestrator.hub.ShardHub`, runs
the Ray Train ``TorchTrainer`` (whose rank 0 runs the loop), and turns the hub's progress
into a progress bar and one summary line per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import ray

from orchestrator import checkpoint as ckpt
from orchestrator.config import Config, dump_yaml, load_config, to_dict
from orchestrator.metrics import summary_line
from orchestrator.pools import check_fits, demands, threads_for

logger = logging.getLogger(__name__)

NAMESPACE = "rayalign"


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{path}.")
        elif a.get(key) != b.get(key):
            out.append(path)
    return out


def resolve_run(cfg: Config | None, output_dir: Path, *, resume: bool) -> tuple[Config, Path | None]:
    """The config to run and the checkpoint to resume from; refuses to clobber an existing run."""
    if not resume:
        if (output_dir / "metrics.jsonl").exists() or (output_dir / "checkpoints").exists():
            raise ValueError(f"{output_dir} already holds a run; pass --resume to continue it, or choose a new --output-dir")
        if cfg is None:
            raise ValueError("give --preset NAME or --config FILE")
        return cfg, None
    checkpoint = ckpt.latest_checkpoint(output_dir / "checkpoints")
    if checkpoint is None:
        raise ValueError(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}; start a new run without --resume")
    saved = load_config(checkpoint / "config.yaml")
    if cfg is None:
        return saved, checkpoint
    changed = [d for d in _differences(to_dict(saved), to_dict(cfg)) if d != "train.epochs"]
    if changed:
        raise ValueError(f"--resume with a config that differs from the run's in {changed}; only train.epochs may change on resume")
    return cfg, checkpoint


def _check_names(cfg: Config) -> None:
    """Fail before any actor starts on names that only actors would otherwise resolve."""
    from actors.policy import check_pipeline_dir
    from actors.prompts import read_prompts
    from actors.rewards import build_reward_from_config

    # The model first: a preset's placeholder model path is the first thing a user must set.
    if cfg.model.path is not None:
        check_pipeline_dir(cfg.model.path)
    build_reward_from_config(cfg.reward).check()
    read_prompts(cfg.train.prompts)
    if cfg.train.eval_every:
        read_prompts(cfg.train.eval_prompts)


def _env_vars_to_add(wanted: dict[str, str]) -> dict[str, str]:
    """``wanted`` minus the variables a submitted Ray Job's runtime_env already sets.

    Inside a Ray Job, ray.init refuses a runtime_env that sets a variable the job's own
    runtime_env sets too (even to the same value); the job's value wins.
    """
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:
        return wanted
    taken = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in wanted.items() if key not in taken}


def connect(address: str | None, num_cpus: int | None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), or start a local cluster with ``num_cpus`` logical CPUs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Passive OpenMP waits: with more busy processes than cores (pools share a CPU
    # machine), spin-waiting torch threads were measured to slow every pool ~10x.
    wanted = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env = {"env_vars": _env_vars_to_add(wanted)}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
    else:
        # Logical CPUs can exceed physical ones: pools take fractions and mostly wait on each other.
        # address="local": always a new cluster. A bare ray.init() would attach to any cluster that
        # `ray start` left running on this machine (and then refuse num_cpus).
        ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), namespace=NAMESPACE, runtime_env=env, log_to_driver=True)


def train(
    cfg: Config | None,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run (or resume) training; returns the output directory.

    ``on_epoch`` is called in this process with each finished epoch's metrics (what
    ``metrics.jsonl`` records), e.g. to report them to Ray Tune.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.loop import train_loop_per_worker

    output_dir = Path(output_dir).resolve()
    cfg, resume_from = resolve_run(cfg, output_dir, resume=resume)
    _check_names(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, output_dir / "config.yaml")

    connect(address, num_cpus)
    check_fits(demands(pools=cfg.pools, learner=cfg.learner, uses_reference=cfg.pools.reference.num_actors > 0), ray.cluster_resources())

    hub_name = f"rayalign-hub-{uuid.uuid4().hex[:8]}"
    from orchestrator.hub import ShardHub

    hub = ray.remote(ShardHub).options(name=hub_name, namespace=NAMESPACE, num_cpus=0).remote()
    use_gpu = cfg.learner.num_gpus_per_worker > 0
    resources = {"CPU": cfg.learner.num_cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.learner.num_gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "output_dir": str(output_dir),
            "resume_from": str(resume_from) if resume_from else None,
            "hub_name": hub_name,
            "namespace": NAMESPACE,
            "learner_threads": threads_for(cfg.learner.num_cpus_per_worker),
        },
        scaling_config=ScalingConfig(num_workers=cfg.learner.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=output_dir.name, storage_path=str(output_dir / "ray_train"), failure_config=FailureConfig(max_failures=0)),
    )
    start_epoch = ckpt.read_state(resume_from)["epoch"] if resume_from else 0
    if resume_from:
        print(f"resuming from {resume_from} (epoch {start_epoch} of {cfg.train.epochs})", flush=True)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # reported by the main thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="rayalign-trainer", daemon=True)
    thread.start()
    _follow(hub, thread, total=cfg.train.epochs, start=start_epoch, show_bar=progress, on_epoch=on_epoch)
    thread.join()
    ray.kill(hub)
    if "error" in outcome:
        raise _user_facing(outcome["error"])
    return output_dir


def _follow(hub, thread: threading.Thread, *, total: int, start: int, show_bar: bool, on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
    """Progress bar over epochs and one summary line per finished epoch, until training ends."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="epoch", disable=not show_bar, dynamic_ncols=True)
    try:
        while True:
            alive = thread.is_alive()
            try:
                progress, summaries = ray.get(hub.poll.remote(), timeout=10)
            except Exception:  # the hub is gone or busy: keep waiting on the trainer
                progress, summaries = {}, []
            for metrics in summaries:
                bar.write(summary_line(metrics, total))
                bar.update(max(0, metrics["epoch"] - bar.n))
                if on_epoch is not None:
                    on_epoch(metrics)
            if progress:
                bar.set_postfix_str(f"epoch {progress.get('epoch')}: {progress.get('phase')}")
            if not alive:
                break
            time.sleep(0.5)
    finally:
        bar.close()


def _user_facing(error: BaseException) -> BaseException:
    """Unwrap Ray Train's wrappers so a user error inside a worker reads as that error."""
    seen = error
    for _ in range(10):
        cause = getattr(seen, "cause", None) or seen.__cause__ or getattr(seen, "worker_failures", None)
        if isinstance(cause, dict):
            cause = next(iter(cause.values()), None)
        if cause is None or cause is seen:
            break
        seen = cause
        if isinstance(seen, ValueError):
            return ValueError(str(seen).splitlines()[0] if str(seen) else repr(seen))
    return error
