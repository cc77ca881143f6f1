"""The RL loop, read top to bottom: sample -> score -> reference -> advantages -> update -> sync.

It runs inside a Ray Train ``TorchTrainer``: every worker is a learner rank holding the
policy under DeepSpeed; rank 0 additionally runs the :class:`Controller`, which owns the
rollout, reward and reference pools and moves ObjectRefs between them. The controller
never materialises trajectory tensors: rollout actors return trajectories and images as
two objects; images go straight to reward actors, trajectories straight to reference
actors and learners. Learner ranks receive their shard's refs in-band from the
:class:`~orchestrator.hub.ShardHub` actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from orchestrator import checkpoint as ckpt
from orchestrator.advantages import PerPromptStatTracker, batch_normalize, clip_advantages, group_normalize
from orchestrator.config import Config, dump_yaml, from_dict
from orchestrator.metrics import MetricsWriter
from orchestrator.pools import Pools, start_pools

logger = logging.getLogger(__name__)


def epoch_prompts(prompts: list[str], *, seed: int, epoch: int, count: int, per_prompt: int = 1) -> tuple[list[str], list[int]]:
    """The prompts and per-sample seeds of ``epoch``: a pure function of (seed, epoch), so resumed
    runs see exactly the prompts an uninterrupted run would.

    ``count / per_prompt`` prompts are drawn (without replacement while the list lasts) and
    each is repeated ``per_prompt`` times in a row, so sample ``i`` belongs to group ``i // per_prompt``.
    """
    rng = np.random.default_rng([seed, epoch])
    groups = count // per_prompt
    picks = rng.choice(len(prompts), size=groups, replace=groups > len(prompts))
    chosen = [prompts[i] for i in picks for _ in range(per_prompt)]
    seeds = np.random.SeedSequence([seed, epoch, 1]).generate_state(count, dtype=np.uint32)
    return chosen, [int(s) for s in seeds]


def shard_rows(total: int, world_size: int) -> list[range]:
    """Contiguous global sample indices of each learner rank."""
    per_rank = total // world_size
    return [range(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


@dataclasses.dataclass
class EpochBatch:
    """What the controller knows about one epoch's samples: refs and small arrays only."""

    trajectory_refs: list[Any]
    reference_refs: list[Any] | None
    chunk_sizes: list[int]
    prompts: list[str]
    rewards: np.ndarray  # (samples,)
    advantages: np.ndarray  # (samples,)
    reward_info: dict[str, float]
    advantage_info: dict[str, float]
    timings: dict[str, float]

    def shard(self, rows: range) -> dict[str, Any]:
        """Descriptor for one learner rank: (trajectory ref, reference ref, row indices) per chunk."""
        starts = np.cumsum([0, *self.chunk_sizes])
        parts = []
        for c, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            take = [i - lo for i in rows if lo <= i < hi]
            if take:
                parts.append((self.trajectory_refs[c], self.reference_refs[c] if self.reference_refs else None, take))
        return {"parts": parts, "advantages": self.advantages[rows.start : rows.stop]}


def fetch_shard(descriptor: dict[str, Any]):
    """Learner side: pull this rank's trajectories (and reference means) from the object store."""
    from actors.trajectory import Trajectories

    parts = descriptor["parts"]
    trajectories = Trajectories.concatenate([ray.get(t).select(rows) for t, _, rows in parts])
    ref_means = None
    if parts and parts[0][1] is not None:
        ref_means = np.concatenate([ray.get(r)[rows] for _, r, rows in parts])
    return trajectories, descriptor["advantages"], ref_means


class Controller:
    """Rank 0's half of the loop: the pools, advantages, weight sync, metrics and eval grids."""

    def __init__(self, cfg: Config, output_dir: Path, hub, *, state: dict[str, Any] | None):
        from actors.prompts import read_prompts

        self.cfg = cfg
        self.output_dir = output_dir
        self.hub = hub
        self.prompts = read_prompts(cfg.train.prompts)
        self.eval_prompts = read_prompts(cfg.train.eval_prompts) if cfg.train.eval_every else []
        self.tracker = PerPromptStatTracker(buffer_size=cfg.train.stat_buffer_size, min_count=cfg.train.stat_min_count)
        self.samples_seen = 0
        self.policy_version = 0
        if state is not None:
            self.tracker.load_state_dict(state["stat_tracker"])
            self.samples_seen = state["samples_seen"]
            self.policy_version = state["policy_version"]
        self.pools: Pools = start_pools(cfg, uses_reference=cfg.pools.reference.num_actors > 0)
        self.metrics = MetricsWriter(output_dir, resume_epoch=state["epoch"] if state else None)

    def progress(self, **fields) -> None:
        self.hub.set_progress.remote(fields)

    def _sample(self, prompts: list[str], seeds: list[int]) -> tuple[list[list[str]], list[Any], list[Any]]:
        """Fan prompts out to the rollout pool in sampling batches: (prompt chunks, trajectory refs, image refs)."""
        size = self.cfg.sampling.batch_size
        chunks = [(prompts[i : i + size], seeds[i : i + size]) for i in range(0, len(prompts), size)]
        calls = [self.pools.rollout.next().sample.options(num_returns=2).remote(p, s) for p, s in chunks]
        return [p for p, _ in chunks], [t for t, _ in calls], [i for _, i in calls]

    # -------------------------------------------------------------- sample, score, reference
    def collect(self, epoch: int) -> EpochBatch:
        cfg = self.cfg
        prompts, seeds = epoch_prompts(self.prompts, seed=cfg.seed, epoch=epoch, count=cfg.train.samples_per_epoch, per_prompt=cfg.train.samples_per_prompt)
        self.progress(epoch=epoch, phase="rollout")
        started = time.perf_counter()
        chunks, trajectory_refs, image_refs = self._sample(prompts, seeds)
        # Reward and reference calls are queued at once; Ray starts each as its input is ready.
        reward_refs = [self.pools.reward.next().score.remote(images, p, index) for index, (images, p) in enumerate(zip(image_refs, chunks))]
        reference_refs = [self.pools.reference.next().reference_means.remote(t) for t in trajectory_refs] if self.pools.reference else None
        ray.wait(trajectory_refs, num_returns=len(trajectory_refs), fetch_local=False)
        rollout_s = time.perf_counter() - started
        self.progress(epoch=epoch, phase="reward")
        scored = ray.get(reward_refs)
        reward_s = time.perf_counter() - started - rollout_s
        self.progress(epoch=epoch, phase="reference")
        if reference_refs:
            ray.wait(reference_refs, num_returns=len(reference_refs), fetch_local=False)
        reference_s = time.perf_counter() - started - rollout_s - reward_s

        rewards = np.concatenate([s for s, _ in scored])  # (samples,)
        advantage_info: dict[str, float] = {}
        if cfg.train.advantage == "per_prompt":
            advantages = self.tracker.update(prompts, rewards)
        elif cfg.train.advantage == "group":
            groups = np.arange(len(prompts)) // cfg.train.samples_per_prompt
            advantages, zero_spread = group_normalize(rewards, groups.tolist())
            # Groups whose samples all scored the same teach nothing this epoch.
            advantage_info["advantages/zero_spread_groups"] = float(zero_spread)
        else:
            advantages = batch_normalize(rewards)
        advantages = clip_advantages(advantages, cfg.train.adv_clip_max)
        sizes = [len(p) for p in chunks]
        info = {key: float(np.average([i[key] for _, i in scored], weights=sizes)) for key in scored[0][1]}
        return EpochBatch(
            trajectory_refs=trajectory_refs,
            reference_refs=reference_refs,
            chunk_sizes=sizes,
            prompts=prompts,
            rewards=rewards,
            advantages=advantages.astype(np.float32),
            reward_info=info,
            advantage_info=advantage_info,
            timings={"time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/reference_s": reference_s},
        )

    def publish(self, epoch: int, batch: EpochBatch, world_size: int) -> None:
        shards = [batch.shard(rows) for rows in shard_rows(len(batch.prompts), world_size)]
        ray.get(self.hub.put.remote(epoch, shards))
        self.progress(epoch=epoch, phase="learn")

    # -------------------------------------------------------------- sync, eval, metrics
    def sync(self, weights: dict[str, np.ndarray], version: int) -> tuple[float, int]:
        """Ship new trainable weights to every rollout actor: one ray.put, one call each."""
        started = time.perf_counter()
        ref = ray.put(weights)
        ray.get([actor.set_weights.remote(ref, version) for actor in self.pools.rollout.actors])
        self.policy_version = version
        return time.perf_counter() - started, int(sum(a.nbytes for a in weights.values()))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Sample the eval prompts with fixed seeds, score them, save an image grid."""
        from actors.images import make_grid, save_png

        per_prompt = 2
        prompts = [p for p in self.eval_prompts for _ in range(per_prompt)]
        seeds = [int(s) for s in np.random.SeedSequence([self.cfg.seed, 0, 2]).generate_state(len(prompts), dtype=np.uint32)]
        chunks, _, images = self._sample(prompts, seeds)
        scored = ray.get([self.pools.reward.next().score.remote(img, p, k) for k, (img, p) in enumerate(zip(images, chunks))])
        save_png(make_grid(np.concatenate(ray.get(images)), columns=per_prompt * 3), self.output_dir / "images" / f"epoch_{epoch:04d}.png")
        return {"eval/reward_mean": float(np.concatenate([s for s, _ in scored]).mean())}

    def record(self, epoch: int, batch: EpochBatch, learn_stats: dict[str, float], *, learn_s: float, sync_s: float, sync_bytes: int, epoch_s: float, eval_metrics: dict[str, float]) -> dict[str, Any]:
        self.samples_seen += len(batch.prompts)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "policy_version": self.policy_version,
            "samples": self.samples_seen,
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std()),
            "kl/mean": learn_stats.get("kl/mean", float("nan")),
            "policy/clipfrac": learn_stats.get("policy/clipfrac", 0.0),
            "policy/approx_kl": learn_stats.get("policy/approx_kl", 0.0),
            **batch.timings,
            "time/learn_s": learn_s,
            "time/sync_s": sync_s,
            "time/epoch_s": epoch_s,
            "throughput/samples_per_s": len(batch.prompts) / epoch_s,
            "sync/bytes": sync_bytes,
            # Which prompts this epoch trained on, compactly: equal digests = equal prompt lists.
            "prompts/digest": zlib.crc32("\n".join(batch.prompts).encode("utf-8")),
            **{f"reward/{k}": v for k, v in batch.reward_info.items()},
            **batch.advantage_info,
            **{k: v for k, v in learn_stats.items() if k not in ("kl/mean", "policy/clipfrac", "policy/approx_kl")},
            **eval_metrics,
        }
        self.metrics.write(metrics)
        self.hub.add_summary.remote(metrics)
        return metrics

    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "policy_version": self.policy_version,
            "samples_seen": self.samples_seen,
            "stat_tracker": self.tracker.state_dict(),
            # No generator state to save: every random stream (prompts, sampling noise,
            # learner shuffles, dropout) is derived from (seed, epoch, rank), so the epoch
            # counter restores them all.
            "rng": {"derived_from": ["seed", "epoch", "rank"], "seed": self.cfg.seed},
        }

    def close(self) -> None:
        self.metrics.close()
        self.pools.shutdown()


def _all_reduce_mean(stats: dict[str, float], world_size: int) -> dict[str, float]:
    """Average numeric statistics over learner ranks (plain numbers: no ObjectRefs cross collectives)."""
    if world_size == 1 or not stats:
        return stats
    import torch.distributed as dist

    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / world_size for k, v in zip(keys, values.tolist())}


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def save_checkpoint(*, epoch: int, cfg: Config, output_dir: Path, learner, weights, controller: Controller | None, rank: int, world_size: int) -> None:
    """Collective: every rank writes its DeepSpeed partition; rank 0 the rest, then commits."""
    root = output_dir / "checkpoints"
    if rank == 0:
        ckpt.prepare_staging(root, epoch)
    _barrier(world_size)
    staged = ckpt.staging_dir(root, epoch)
    learner.engine.save_checkpoint(str(staged / "deepspeed"), tag="state")
    _barrier(world_size)
    if rank == 0:
        if learner.policy.lora_config is not None:
            learner.write_lora(staged / "lora", weights)
        else:
            from safetensors.numpy import save_file

            (staged / "unet").mkdir()
            save_file(weights, str(staged / "unet" / "diffusion_pytorch_model.safetensors"))
        ckpt.write_json_atomic(staged / "state.json", controller.state(epoch))
        dump_yaml(cfg, staged / "config.yaml")
        final = ckpt.commit(root, epoch, keep=cfg.train.keep_checkpoints)
        logger.info("checkpoint %s written", final)
    _barrier(world_size)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: every rank learns; rank 0 also drives the pools."""
    from actors.learner import Learner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg: Config = from_dict(Config, loop_config["config"])
    output_dir = Path(loop_config["output_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config.get("learner_threads", 1))
    hub = ray.get_actor(loop_config["hub_name"], namespace=loop_config["namespace"])

    learner = Learner(model=cfg.model, learner=cfg.learner, train=cfg.train, seed=cfg.seed, rank=rank, world_size=world_size,
                      log_prob_reduction=cfg.sampling.log_prob_reduction)
    learner.prepare(cfg.sampling.num_steps)
    state, start_epoch = None, 0
    if loop_config["resume_from"]:
        resume_from = Path(loop_config["resume_from"])
        learner.engine.load_checkpoint(str(resume_from / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        state = ckpt.read_state(resume_from)
        start_epoch = state["epoch"]

    controller = Controller(cfg, output_dir, hub, state=state) if rank == 0 else None
    weights = learner.trainable_state()
    if controller is not None:
        controller.sync(weights, version=start_epoch)
        if start_epoch == 0 and cfg.train.eval_every:
            controller.evaluate(0)

    try:
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            epoch_started = time.perf_counter()
            if controller is not None:
                batch = controller.collect(epoch)
                controller.publish(epoch, batch, world_size)
            shard, advantages, ref_means = fetch_shard(ray.get(hub.get.remote(epoch, rank)))

            learn_started = time.perf_counter()
            stats = learner.train_epoch(shard, advantages, ref_means, epoch=epoch)
            stats = _all_reduce_mean(stats, world_size)
            learn_s = time.perf_counter() - learn_started

            weights = learner.trainable_state()  # a collective under ZeRO-3
            if controller is not None:
                sync_s, sync_bytes = controller.sync(weights, version=epoch)
                eval_metrics = controller.evaluate(epoch) if cfg.train.eval_every and (epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs) else {}
                controller.record(epoch, batch, stats, learn_s=learn_s, sync_s=sync_s, sync_bytes=sync_bytes,
                                  epoch_s=time.perf_counter() - epoch_started, eval_metrics=eval_metrics)
            if epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs:
                save_checkpoint(epoch=epoch, cfg=cfg, output_dir=output_dir, learner=learner, weights=weights, controller=controller, rank=rank, world_size=world_size)
    finally:
        if controller is not None:
            controller.close()
