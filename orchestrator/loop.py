"""The RL loop, read top to bottom: sample -> score -> reference -> advantages -> update -> sync.

It runs inside a Ray Train ``TorchTrainer``: every worker is a learner rank holding the
policy under DeepSpeed; rank 0 additionally runs the :class:`~orchestrator.controller.Controller`,
which owns the rollout, reward and reference pools. Learner ranks receive their shard's
refs in-band from the :class:`~orchestrator.hub.ShardHub` actor (never through torch
collectives, which hang on ObjectRefs).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from safetensors.numpy import save_file

from actors.diffusion.trajectory import Trajectories
from actors.workers.learner import Learner
from orchestrator import rundir
from orchestrator.config import Config, config_to_yaml, from_dict
from orchestrator.controller import Controller, Launched
from orchestrator.rundir import Checkpoint, RunDir

logger = logging.getLogger(__name__)


def fetch_shard(descriptor: dict[str, Any]):
    """Learner side: pull this rank's trajectories (and reference means) from the object store."""
    parts = descriptor["parts"]
    trajectories = Trajectories.concatenate([ray.get(t).select(rows) for t, _, rows in parts])
    ref_means = None
    if parts and parts[0][1] is not None:
        ref_means = np.concatenate([ray.get(r)[rows] for _, r, rows in parts])
    return trajectories, descriptor["advantages"], ref_means, descriptor["versions"]


def _all_reduce_mean(stats: dict[str, float], world_size: int) -> dict[str, float]:
    """Average numeric statistics over learner ranks (plain numbers: no ObjectRefs cross collectives)."""
    if world_size == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / world_size for k, v in zip(keys, values.tolist())}


def _gather_node_ids(world_size: int) -> list[str]:
    """The Ray node of every learner rank (plain strings: no ObjectRefs cross collectives)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, node)
    return nodes


def _from_rank0(value: str | None, world_size: int) -> str | None:
    """Rank 0's ``value`` on every rank (a plain string: no ObjectRefs cross collectives)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def save_checkpoint(
    *, epoch: int, cfg: Config, run: RunDir, learner, weights, controller: Controller | None, rank: int, world_size: int
) -> None:
    """Collective: every rank writes its own DeepSpeed partition straight to the run's storage,
    rank 0 the rest; rank 0 marks the checkpoint complete only after all of it is written.

    Storage that fails (full, read-only, unreachable) is an error naming the checkpoint and the
    cause; the unfinished checkpoint has no marker, so ``--resume`` takes the previous one.
    """
    try:
        _write_checkpoint(
            epoch=epoch, cfg=cfg, run=run, learner=learner, weights=weights, controller=controller, rank=rank, world_size=world_size
        )
    except (OSError, ValueError) as error:  # storage errors: OSError locally, ValueError naming the URI in object storage
        previous = run.latest_checkpoint()
        kept = f"{previous.name} stays the latest complete checkpoint" if previous else "there is no earlier complete checkpoint"
        raise ValueError(
            f"writing checkpoint epoch {epoch} to {run.checkpoints} failed on learner rank {rank}: {error}; it is left "
            f"incomplete (no COMPLETE marker) and {kept}. Free space or fix permissions, then continue with --resume"
        ) from error


def _write_checkpoint(
    *, epoch: int, cfg: Config, run: RunDir, learner, weights, controller: Controller | None, rank: int, world_size: int
) -> None:
    checkpoint = rundir.begin_checkpoint(run, epoch) if rank == 0 else run.checkpoint(epoch)
    _barrier(world_size)
    with checkpoint.deepspeed.writing_dir() as local:
        learner.engine.save_checkpoint(str(local), tag="state")
    _barrier(world_size)
    if rank == 0:
        if learner.policy.lora_config is not None:
            with checkpoint.lora.writing_dir() as local:
                learner.write_lora(local, weights)
            rundir.write_sampling(checkpoint.lora, cfg.sampling, cfg.model.path)  # eval and serve sample as training did
        else:
            with checkpoint.unet.writing_dir() as local:  # a diffusers UNet folder: config.json + weights
                learner.save_unet_config(local)
                save_file(weights, str(local / "diffusion_pytorch_model.safetensors"))
        controller.write_replay(checkpoint)
        checkpoint.state.write_text(json.dumps(controller.state(epoch), indent=2) + "\n")
        checkpoint.config.write_text(config_to_yaml(cfg))
        rundir.commit_checkpoint(run, checkpoint, keep=cfg.train.keep_checkpoints, best=controller.guards.best_epoch == epoch)
        logger.info("checkpoint %s written", checkpoint.location)
    _barrier(world_size)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: every rank learns; rank 0 also drives the pools."""
    entered = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg: Config = from_dict(Config, loop_config["config"])
    run = RunDir(loop_config["output_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config.get("learner_threads", 1))
    hub = ray.get_actor(loop_config["hub_name"], namespace=loop_config["namespace"])

    learner = Learner(
        model=cfg.model,
        learner=cfg.learner,
        train=cfg.train,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        log_prob_reduction=cfg.sampling.log_prob_reduction,
    )
    learner.prepare(cfg.sampling.recorded_steps)
    state, start_epoch, resume_from = None, 0, None
    if loop_config["resume_from"]:
        resume_from = Checkpoint(loop_config["resume_from"])
        with resume_from.deepspeed.as_local_dir() as local:  # every rank reads the checkpoint from storage itself
            learner.engine.load_checkpoint(str(local), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        state = resume_from.read_state()
        start_epoch = state["epoch"]
    # A run that train.early_stop ended is finished, as one that ran all its epochs: --resume trains no more.
    last_epoch = start_epoch if state is not None and (state.get("guards") or {}).get("stopped_epoch") else cfg.train.epochs

    learner_ready = time.time()
    learner_nodes = _gather_node_ids(world_size)
    controller = Controller(cfg, run, hub, state=state, checkpoint=resume_from) if rank == 0 else None
    weights = learner.trainable_state()
    asynchronous = cfg.train.mode == "async"
    if controller is not None:
        controller.sync(weights, version=start_epoch)
        if start_epoch == 0 and cfg.train.eval_every:
            controller.evaluate(0)
        # Where the time before the first epoch went; the driver's own phases come in loop_config.
        driver = dict(loop_config.get("startup", {}))
        importing, imported = driver.pop("learner_imported", (entered, entered))
        controller.startup.update(
            {
                **driver,
                "time/startup/learner_group_s": importing - driver.get("trainer_started_at", importing),
                "time/startup/learner_imports_s": imported - importing,
                "time/startup/learner_init_s": learner_ready - imported,
                "time/startup_s": time.time() - driver.get("started_at", entered),
            }
        )
        controller.startup.pop("started_at", None)
        controller.startup.pop("trainer_started_at", None)
        failed_at = controller.startup.pop("failed_at", None)
        if failed_at is not None:  # a restarted learner group: how long from losing a learner to training again
            controller.startup["faults/recovery_s"] = time.time() - failed_at
        controller.pool_nodes["learner"] = len(set(learner_nodes))

    pending: Launched | None = None
    try:
        for epoch in range(start_epoch + 1, last_epoch + 1):
            epoch_started = time.perf_counter()
            if controller is not None:
                batch = controller.next_batch(epoch, pending)
                # Async: the next epoch samples with the weights the learners are about to
                # update, while they update (one version of lag, corrected by IS weights).
                pending = controller.launch(epoch + 1) if asynchronous and epoch < cfg.train.epochs else None
                replay_stats = controller.publish(epoch, batch, world_size)
            descriptor = ray.get(hub.get.remote(epoch, rank))
            shard, advantages, ref_means, versions = fetch_shard(descriptor)

            learn_started = time.perf_counter()
            stats = learner.train_epoch(
                shard,
                advantages,
                ref_means,
                epoch=epoch,
                versions=versions,
                learner_version=epoch - 1,
                is_truncation=cfg.replay.is_truncation,
                beta=descriptor["beta"],
            )
            stats = _all_reduce_mean(stats, world_size)
            learn_s = time.perf_counter() - learn_started
            del shard, ref_means

            weights = learner.trainable_state()  # a collective under ZeRO-3
            checkpointing = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
            stop = None
            if controller is not None:
                sync_s, sync_bytes = controller.sync(weights, version=epoch, wait=not asynchronous)
                eval_metrics = (
                    controller.evaluate(epoch)
                    if cfg.train.eval_every and (epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs)
                    else {}
                )
                stop = controller.watch(epoch, stats, eval_metrics, checkpointed=checkpointing)  # beta, the best, early stop
            if cfg.train.early_stop is not None:
                # Rank 0 decides (it alone holds the gold reward); every rank writes the last checkpoint and leaves.
                stop = _from_rank0(stop, world_size)
                checkpointing = checkpointing or stop is not None
            if controller is not None:
                if checkpointing:
                    controller.prefetch(pending)
                    pending = None
                controller.release()
                recorded = controller.record(
                    epoch,
                    batch,
                    stats,
                    replay_stats=replay_stats,
                    learn_s=learn_s,
                    sync_s=sync_s,
                    sync_bytes=sync_bytes,
                    epoch_s=time.perf_counter() - epoch_started,
                    eval_metrics=eval_metrics,
                )
                del batch
            if checkpointing:
                save_checkpoint(
                    epoch=epoch, cfg=cfg, run=run, learner=learner, weights=weights, controller=controller, rank=rank, world_size=world_size
                )
                if controller is not None:
                    controller.checkpointed()
            if controller is not None:
                controller.announce(recorded)
            if stop is not None:
                break
    finally:
        if controller is not None:
            controller.close()
