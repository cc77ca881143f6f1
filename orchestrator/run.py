"""Start a training run: check the config against the cluster, launch the learner group, report.

This is what ``rayalign train`` calls. The driver process does no ML: it connects to
Ray, checks that every pool fits, creates the :class:`~orchestrator.hub.ShardHub`, runs
the Ray Train ``TorchTrainer`` (whose rank 0 runs the loop), and turns the hub's progress
into a progress bar and one summary line per epoch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from actors.diffusion.files import SD, check_pipeline_dir, detect_family
from actors.prompts import read_prompts
from actors.rewards.registry import build_reward_from_config
from actors.storage import is_uri
from actors.toy.model import resolve_model_path
from orchestrator import rundir
from orchestrator.cluster import NAMESPACE, connect
from orchestrator.config import Config, config_to_yaml, to_dict
from orchestrator.guards import read_end_line
from orchestrator.hub import ShardHub
from orchestrator.metrics import summary_line
from orchestrator.pools import check_fits, create_pools, demands, threads_for
from orchestrator.rundir import Checkpoint, RunDir
from orchestrator.trackers import DEFAULT_TRACKERS, Trackers, check_trackers

logger = logging.getLogger(__name__)


def learner_entry(loop_config: dict[str, Any]) -> None:
    """What Ray Train runs on every learner: the loop, whose ML imports load there and not in the driver."""
    started = time.time()
    from orchestrator.loop import train_loop_per_worker  # lazy: torch, diffusers and DeepSpeed load in the learners only

    loop_config["startup"]["learner_imported"] = (started, time.time())
    train_loop_per_worker(loop_config)


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


def resolve_run(cfg: Config | None, run: RunDir, *, resume: bool) -> tuple[Config, Checkpoint | None]:
    """The config to run and the checkpoint to resume from; refuses to clobber an existing run.

    ``--resume`` where there is nothing to resume starts the run, so one fixed command (a Ray
    Job's or a RayJob's entrypoint) can be submitted again after any failure. A run that died
    before its first checkpoint is moved aside first (``<dir>.incomplete-N``), never deleted.
    """
    if not resume:
        if run.holds_run():
            raise ValueError(f"{run.root} already holds a run; pass --resume to continue it, or choose a new --output-dir")
        if cfg is None:
            raise ValueError("give --preset NAME or --config FILE")
        return cfg, None
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        if cfg is None:
            raise ValueError(
                f"--resume: no complete checkpoint under {run.checkpoints} to resume, and no --preset or --config to start the run with"
            )
        if run.root.list():
            aside = rundir.move_aside(run)
            logger.warning("%s had no complete checkpoint; moved it to %s and starting the run from the beginning", run.root, aside)
        print(f"--resume: nothing to resume in {run.root}; starting the run", flush=True)
        return cfg, None
    saved = checkpoint.read_config()
    if cfg is None:
        return saved, checkpoint
    changed = [d for d in _differences(to_dict(saved), to_dict(cfg)) if d != "train.epochs"]
    if changed:
        raise ValueError(f"--resume with a config that differs from the run's in {changed}; only train.epochs may change on resume")
    return cfg, checkpoint


def check_names(cfg: Config, *, external_cluster: bool = False) -> None:
    """Fail before any actor starts on names that only actors would otherwise resolve."""
    # The model first: a preset's placeholder model path is the first thing a user must set.
    path = None if cfg.model.path is None else resolve_model_path(cfg.model.path)  # an embedded model's name: its directory
    if path is not None:
        if external_cluster and not is_uri(path) and not Path(path).exists():
            # A path on the cluster's nodes need not exist where the driver runs: each node that loads it checks it.
            logger.info("model path %s is not on this machine; every node that loads it checks it there", path)
        else:
            check_pipeline_dir(path)
    if cfg.sampling.sde_window is not None and (path is None or (not is_uri(path) and Path(path).is_dir())):
        # elsewhere (a URI, a path only the cluster's nodes have) the rollout actors refuse it when they load the model
        family = detect_family(path) if path is not None else SD
        if not family.flow_matching:
            model = "the embedded toy UNet model, an sd model" if path is None else f"{path!r}, a {family.name} model"
            raise ValueError(
                f"sampling.sde_window is set, but model.path is {model} sampled with DDIM; the window (SDE steps inside it, "
                "ODE steps outside) is for flow-matching models (sd3, flux): set sampling.sde_window: null"
            )
    build_reward_from_config(cfg.reward).check()
    if cfg.train.gold_reward is not None:
        build_reward_from_config(cfg.train.gold_reward).check()
    read_prompts(cfg.train.prompts)
    if cfg.train.eval_every:
        read_prompts(cfg.train.eval_prompts)


def train(
    cfg: Config | None,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    dashboard: bool = False,
    loggers: Sequence[str] = DEFAULT_TRACKERS,
) -> str:
    """Run (or resume) training in ``output_dir`` (a local directory or an object-store URI); returns where it is.

    ``on_epoch`` is called in this process with each finished epoch's metrics (what
    ``metrics.jsonl`` records), e.g. to report them to Ray Tune. ``loggers`` names the
    experiment trackers this process logs each epoch to (:mod:`orchestrator.trackers`;
    ``metrics.jsonl`` is written whatever they are). The actor pools are started here, before
    the learner group, so their models load while it forms.
    """
    started_at = time.time()
    run = RunDir(output_dir)
    cfg, resume_from = resolve_run(cfg, run, resume=resume)
    resumed_state = resume_from.read_state() if resume_from is not None else None
    if ((resumed_state or {}).get("guards") or {}).get("stopped_epoch"):
        # Finished, as a run that ran all its epochs is: more epochs would train past the stop the rule chose.
        ended = read_end_line(run, resume_from.read_config().train)  # of the epochs it ran with, not a new train.epochs
        print(f"--resume: nothing to train; the run ended with an {ended}", flush=True)
        return run.root.uri
    check_names(cfg, external_cluster=bool(address or os.environ.get("RAY_ADDRESS")))
    loggers = check_trackers(loggers)
    run.config.write_text(config_to_yaml(cfg))

    connecting = time.time()
    connect(address, num_cpus, dashboard=dashboard)
    connected = time.time()
    uses_reference = cfg.reference_pool_used  # train.reference: adapter_off computes the reference in the learners
    check_fits(demands(pools=cfg.pools, learner=cfg.learner, uses_reference=uses_reference), ray.cluster_resources())

    hub_name = f"rayalign-hub-{uuid.uuid4().hex[:8]}"
    # The hub lives on the driver's node, as Ray Train's controller does: losing any other node
    # must not take the run's bookkeeping with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    hub = ray.remote(ShardHub).options(name=hub_name, namespace=NAMESPACE, num_cpus=0, scheduling_strategy=here).remote()
    pools = create_pools(cfg, uses_reference=uses_reference)  # they load their models while the learner group forms
    hub.set_pools.remote(pools.handles())
    # Learners stay in their node's working directory (Ray Train would move them to its artifacts
    # directory): a relative path in the config then means on a learner what it means on every other actor.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    startup = {
        "started_at": started_at,
        "time/startup/checks_s": connecting - started_at,
        "time/startup/connect_s": connected - connecting,
    }
    failures = 0
    trackers = None
    try:
        # Opened once the pools are loading, as the learner group will be: W&B and MLflow take seconds to start.
        start_epoch = resumed_state["epoch"] if resumed_state is not None else 0
        trackers = Trackers(loggers, run, config=to_dict(cfg), resume_epoch=start_epoch if resumed_state is not None else None)
        while True:
            if resume_from:
                print(f"resuming from {resume_from.location} (epoch {start_epoch} of {cfg.train.epochs})", flush=True)
            trainer = _learner_group(cfg, run, resume_from, hub_name=hub_name, startup={**startup, "trainer_started_at": time.time()})
            outcome: dict[str, Any] = {}

            def fit(trainer=trainer, outcome=outcome) -> None:
                try:
                    outcome["result"] = trainer.fit()
                except BaseException as error:  # reported by the main thread
                    outcome["error"] = error

            thread = threading.Thread(target=fit, name="rayalign-trainer", daemon=True)
            thread.start()
            _follow(hub, thread, total=cfg.train.epochs, start=start_epoch, show_bar=progress, trackers=trackers, on_epoch=on_epoch)
            thread.join()
            if "error" not in outcome:
                break
            dead = _lost_worker(outcome["error"], pools.actor_ids())
            if dead is None or failures >= cfg.learner.max_failures:
                raise _user_facing(outcome["error"])
            # A learner's process or node is gone (not an error of the run itself): start the group again
            # from the last complete checkpoint; the pools and the hub outlive it.
            failures += 1
            resume_from = run.latest_checkpoint()
            start_epoch = resume_from.read_state()["epoch"] if resume_from else 0
            where = f"checkpoint {resume_from.name}" if resume_from else "the beginning (no checkpoint yet)"
            print(
                f"learner group lost a worker ({dead}); restarting it from {where} ({failures} of learner.max_failures = "
                f"{cfg.learner.max_failures})",
                flush=True,
            )
            ray.get(hub.reset.remote())
            startup = {"faults/learner_restarts": float(failures), "failed_at": time.time()}
    finally:
        if trackers is not None:
            trackers.close(failed=sys.exc_info()[1] is not None)  # in `finally`, the error on its way out, if any
        pools.shutdown()
        ray.kill(hub)
    end = read_end_line(run, cfg.train) if cfg.train.early_stop is not None else None
    if end:
        print(end, flush=True)  # why the run ended and which checkpoint is best
    return run.root.uri


def _learner_group(cfg: Config, run: RunDir, resume_from: Checkpoint | None, *, hub_name: str, startup: dict[str, Any]) -> TorchTrainer:
    """The Ray Train trainer whose workers are the learners (rank 0 also drives the pools)."""
    use_gpu = cfg.learner.num_gpus_per_worker > 0
    resources = {"CPU": cfg.learner.num_cpus_per_worker, **cfg.learner.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.learner.num_gpus_per_worker
    return TorchTrainer(
        learner_entry,
        train_loop_config={
            "config": to_dict(cfg),
            "output_dir": run.root.uri,
            "resume_from": resume_from.location.uri if resume_from else None,
            "hub_name": hub_name,
            "namespace": NAMESPACE,
            "learner_threads": threads_for(cfg.learner.num_cpus_per_worker),
            "startup": startup,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.learner.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.learner.placement.upper(),
        ),
        run_config=RunConfig(
            name=f"{run.root.name}-{uuid.uuid4().hex[:6]}",  # a fresh Ray Train run per start of the group
            storage_path=(run.root / "ray_train").path,
            storage_filesystem=run.root.fs,
            # Restarts are rayalign's (see train()): Ray Train would also retry an error of the run itself.
            failure_config=FailureConfig(max_failures=0),
        ),
    )


def _lost_worker(error: BaseException, pool_actors: set[str]) -> str | None:
    """What died, when ``error`` is a learner's own process or node being lost (a restart can help); None for
    an error of the run itself (a bad value, a pool actor past its restarts), which a restart would repeat."""
    for current in _causes(error):
        failures = getattr(current, "worker_failures", None)
        for rank, reported in sorted(failures.items()) if isinstance(failures, dict) else []:
            failure = getattr(reported, "health_check_failure", reported)  # Ray Train's wrapper of a worker found dead
            # The wrapper's text names the worker's class ("Worker(actor=Actor(RayTrainWorker, ...)") and holds the
            # failure's; the failure alone may not (an ActorUnavailableError says only "The actor <id> is unavailable").
            text = str(reported)
            died = isinstance(failure, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))
            # Ray names the dead actor's class and id in the message (a system death carries no actor_id attribute).
            if died and "RayTrainWorker" in text and not any(actor in text for actor in pool_actors):
                return f"rank {rank}: {' '.join(text.split())[:240]}"
    return None


def _follow(
    hub,
    thread: threading.Thread,
    *,
    total: int,
    start: int,
    show_bar: bool,
    trackers: Trackers,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Progress bar over epochs and one summary line per finished epoch, each epoch to the trackers, until training ends."""
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
                trackers.log_epoch(metrics)
                if on_epoch is not None:
                    on_epoch(metrics)
            if progress:
                bar.set_postfix_str(f"epoch {progress.get('epoch')}: {progress.get('phase')}")
            if not alive:
                break
            time.sleep(0.5)
    finally:
        bar.close()


def _inner(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` wraps: its cause, and a failed learner group's worker failures in rank order."""
    inner = [getattr(error, "cause", None), error.__cause__]
    failures = getattr(error, "worker_failures", None)
    inner += [failures[rank] for rank in sorted(failures)] if isinstance(failures, dict) else []
    return [cause for cause in inner if isinstance(cause, BaseException)]


def _causes(error: BaseException):
    """``error`` and everything it wraps, breadth first, each once."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            queue += _inner(current)


def _user_facing(error: BaseException) -> BaseException:
    """Unwrap Ray Train's and Ray's wrappers so a user error inside a worker reads as that error.

    The causes are searched breadth first, the failed workers in rank order: rank 0 drives the
    pools, and the other ranks' failures are often only the consequence of its failure.
    """
    for current in _causes(error):
        if isinstance(current, ValueError):
            text = str(current).strip()
            if not type(current).__module__.startswith("ray"):
                return ValueError(text.splitlines()[0] if text else repr(current))
            if not _inner(current):
                # A Ray task error that came without its cause: the user's error is its traceback's last line.
                return ValueError(text.splitlines()[-1].removeprefix("ValueError: ") if text else repr(current))
    return error
