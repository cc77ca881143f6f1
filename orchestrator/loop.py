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
import threading
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
from orchestrator.metrics import MetricsWriter, memory_stats, object_store_bytes
from orchestrator.pools import Pools, start_pools
from orchestrator.replay import ChunkKey, ReplayBuffer, ReplayEntry, read_replay, staleness_stats, write_replay

logger = logging.getLogger(__name__)

REPLAY_FILE = "replay.parquet"
"""The replay buffer in a checkpoint: every buffered sample with its arrays."""
PREFETCHED_FILE = "prefetched.parquet"
"""Async mode: the next epoch's samples, drawn with the older weights before the checkpoint."""


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
    """What the controller knows about one epoch's fresh samples: refs and small arrays only."""

    epoch: int
    version: int
    """Policy version that sampled every trajectory of this batch."""
    trajectory_refs: list[Any]
    reference_refs: list[Any] | None
    chunk_sizes: list[int]
    prompts: list[str]
    rewards: np.ndarray  # (samples,)
    advantages: np.ndarray  # (samples,)
    reward_info: dict[str, float]
    advantage_info: dict[str, float]
    timings: dict[str, float]
    busy: dict[str, float]
    """Compute seconds per pool ("rollout", "reward", "reference"), the critical path
    of the sampling phase ("critical") and seconds spent loading weights ("load")."""

    def entries(self) -> list[ReplayEntry]:
        rows = [(c, r) for c, size in enumerate(self.chunk_sizes) for r in range(size)]
        return [
            ReplayEntry(epoch=self.epoch, index=i, chunk=c, row=r, version=self.version, prompt=self.prompts[i],
                        reward=float(self.rewards[i]), advantage=float(self.advantages[i]))
            for i, (c, r) in enumerate(rows)
        ]

    def meta(self) -> dict[str, Any]:
        """The JSON-able rest of the batch (its samples are saved as replay rows)."""
        return {"epoch": self.epoch, "version": self.version, "chunk_sizes": self.chunk_sizes, "reward_info": self.reward_info,
                "advantage_info": self.advantage_info, "timings": self.timings, "busy": self.busy}


@dataclasses.dataclass
class Launched:
    """An epoch's rollout, reward and reference calls, submitted by a feeder thread that
    keeps at most ``replay.max_in_flight`` rollout calls unfinished."""

    epoch: int
    version: int
    weights: Any
    """Ref of the weights of ``version``, fixed at launch: a later sync must not change them."""
    prompts: list[str]
    chunks: list[tuple[list[str], list[int]]]
    started: float
    thread: threading.Thread | None = None
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[BaseException] = dataclasses.field(default_factory=list)


def shard_descriptor(selected: list[ReplayEntry], rows: range, chunk_refs: dict[ChunkKey, tuple[Any, Any]]) -> dict[str, Any]:
    """Descriptor for one learner rank: (trajectory ref, reference ref, rows) per run of
    entries from the same chunk, plus each row's advantage and behaviour version."""
    mine = selected[rows.start : rows.stop]
    parts: list[tuple[Any, Any, list[int]]] = []
    last = None
    for entry in mine:
        if entry.key != last:
            trajectory_ref, reference_ref = chunk_refs[entry.key]
            parts.append((trajectory_ref, reference_ref, []))
            last = entry.key
        parts[-1][2].append(entry.row)
    return {
        "parts": parts,
        "advantages": np.array([e.advantage for e in mine], dtype=np.float32),
        "versions": np.array([e.version for e in mine], dtype=np.int64),
    }


def fetch_shard(descriptor: dict[str, Any]):
    """Learner side: pull this rank's trajectories (and reference means) from the object store."""
    from actors.trajectory import Trajectories

    parts = descriptor["parts"]
    trajectories = Trajectories.concatenate([ray.get(t).select(rows) for t, _, rows in parts])
    ref_means = None
    if parts and parts[0][1] is not None:
        ref_means = np.concatenate([ray.get(r)[rows] for _, r, rows in parts])
    return trajectories, descriptor["advantages"], ref_means, descriptor["versions"]


class Controller:
    """Rank 0's half of the loop: the pools, the replay buffer, advantages, weight sync, metrics and eval grids."""

    def __init__(self, cfg: Config, output_dir: Path, hub, *, state: dict[str, Any] | None, checkpoint: Path | None = None):
        from actors.prompts import read_prompts

        self.cfg = cfg
        self.output_dir = output_dir
        self.hub = hub
        self.prompts = read_prompts(cfg.train.prompts)
        self.eval_prompts = read_prompts(cfg.train.eval_prompts) if cfg.train.eval_every else []
        self.tracker = PerPromptStatTracker(buffer_size=cfg.train.stat_buffer_size, min_count=cfg.train.stat_min_count)
        self.replay = ReplayBuffer(capacity=cfg.replay.capacity, max_staleness=cfg.replay.max_staleness, max_reuse=cfg.replay.max_reuse)
        self.chunk_refs: dict[ChunkKey, tuple[Any, Any]] = {}
        self.prefetched: EpochBatch | None = None
        self.samples_seen = 0
        self.policy_version = 0
        self.weights_ref = None
        self._store_peak = 0.0
        self.pools: Pools = start_pools(cfg, uses_reference=cfg.pools.reference.num_actors > 0)
        if state is not None:
            self.tracker.load_state_dict(state["stat_tracker"])
            self.samples_seen = state["samples_seen"]
            self.policy_version = state["policy_version"]
            self._restore_replay(checkpoint, state)
        self.metrics = MetricsWriter(output_dir, resume_epoch=state["epoch"] if state else None)

    def progress(self, **fields) -> None:
        self.hub.set_progress.remote(fields)

    def _chunks(self, prompts: list[str], seeds: list[int]) -> list[tuple[list[str], list[int]]]:
        size = self.cfg.sampling.batch_size
        return [(prompts[i : i + size], seeds[i : i + size]) for i in range(0, len(prompts), size)]

    def _sample_call(self, prompts: list[str], seeds: list[int], version: int, weights: Any):
        """(trajectories, images, timings) refs of one sampling batch with policy ``version``, whose weights are ``weights``."""
        return self.pools.rollout.next().sample.options(num_returns=3).remote(prompts, seeds, version, weights)

    # -------------------------------------------------------------- sample, score, reference
    def launch(self, epoch: int) -> Launched:
        """Start sampling ``epoch`` with the current weights; returns at once."""
        cfg = self.cfg
        prompts, seeds = epoch_prompts(self.prompts, seed=cfg.seed, epoch=epoch, count=cfg.train.samples_per_epoch, per_prompt=cfg.train.samples_per_prompt)
        launched = Launched(epoch=epoch, version=self.policy_version, weights=self.weights_ref, prompts=prompts, chunks=self._chunks(prompts, seeds), started=time.perf_counter())
        launched.thread = threading.Thread(target=self._feed, args=(launched,), name=f"rayalign-rollout-{epoch}", daemon=True)
        launched.thread.start()
        return launched

    def _feed(self, launched: Launched) -> None:
        try:
            in_flight: list[Any] = []
            for index, (prompts, seeds) in enumerate(launched.chunks):
                if len(in_flight) >= self.cfg.replay.max_in_flight:
                    _, in_flight = ray.wait(in_flight, num_returns=1, fetch_local=False)
                trajectories, images, timing = self._sample_call(prompts, seeds, launched.version, launched.weights)
                call = {"trajectories": trajectories, "timing": timing,
                        # Queued at once: Ray starts each as its input is ready.
                        "reward": self.pools.reward.next().score.remote(images, prompts, index)}
                if self.pools.reference:
                    call["reference"], call["reference_timing"] = self.pools.reference.next().reference_means.options(num_returns=2).remote(trajectories)
                launched.calls.append(call)
                in_flight.append(trajectories)
        except BaseException as error:  # re-raised by finish() on the loop's thread
            launched.errors.append(error)

    def finish(self, launched: Launched) -> EpochBatch:
        """Wait for ``launched``'s samples, rewards and reference means; compute advantages."""
        cfg = self.cfg
        epoch = launched.epoch
        self.progress(epoch=epoch, phase="rollout")
        launched.thread.join()
        if launched.errors:
            raise launched.errors[0]
        calls = launched.calls
        trajectory_refs = [c["trajectories"] for c in calls]
        ray.wait(trajectory_refs, num_returns=len(trajectory_refs), fetch_local=False)
        rollout_s = time.perf_counter() - launched.started
        self.progress(epoch=epoch, phase="reward")
        scored = ray.get([c["reward"] for c in calls])
        reward_s = time.perf_counter() - launched.started - rollout_s
        self.progress(epoch=epoch, phase="reference")
        reference_refs = [c["reference"] for c in calls] if self.pools.reference else None
        reference_busy = ray.get([c["reference_timing"] for c in calls]) if self.pools.reference else [0.0]
        reference_s = time.perf_counter() - launched.started - rollout_s - reward_s
        timing = ray.get([c["timing"] for c in calls])

        prompts = launched.prompts
        rewards = np.concatenate([s for s, _, _ in scored])  # (samples,)
        advantage_info: dict[str, float] = {}
        if cfg.train.advantage == "per_prompt":
            advantages = self.tracker.update(prompts, rewards)
        elif cfg.train.advantage == "group":
            groups = np.arange(len(prompts)) // cfg.train.samples_per_prompt
            advantages, zero_spread = group_normalize(rewards, groups.tolist())
            # Groups whose samples all scored the same teach nothing this epoch.
            advantage_info["advantages/zero_spread_groups"] = float(zero_spread)
            advantage_info["advantages/zero_spread_frac"] = float(zero_spread) / (len(prompts) // cfg.train.samples_per_prompt)
        else:
            advantages = batch_normalize(rewards)
        advantages = clip_advantages(advantages, cfg.train.adv_clip_max)
        sizes = [len(p) for p, _ in launched.chunks]
        info = {key: float(np.average([i[key] for _, i, _ in scored], weights=sizes)) for key in scored[0][1]}
        # Round-robin dispatch: chunk c ran on rollout actor c mod n. The sampling phase's
        # critical path is the busiest rollout actor plus the last chunk's reward and reference.
        actors = len(self.pools.rollout)
        per_actor = [sum(t["busy_s"] for t in timing[a::actors]) for a in range(actors)]
        busy = {
            "rollout": float(sum(per_actor)),
            "reward": float(sum(s for _, _, s in scored)),
            "reference": float(sum(reference_busy)),
            "load": float(max(t["load_s"] for t in timing)),
            "critical": float(max(per_actor) + scored[-1][2] + reference_busy[-1]),
        }
        return EpochBatch(
            epoch=epoch,
            version=launched.version,
            trajectory_refs=trajectory_refs,
            reference_refs=reference_refs,
            chunk_sizes=sizes,
            prompts=prompts,
            rewards=rewards,
            advantages=advantages.astype(np.float32),
            reward_info=info,
            advantage_info=advantage_info,
            timings={"time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/reference_s": reference_s},
            busy=busy,
        )

    def next_batch(self, epoch: int, pending: Launched | None) -> EpochBatch:
        """Epoch ``epoch``'s fresh samples: prefetched before a checkpoint, launched ahead (async), or sampled now (sync)."""
        if self.prefetched is not None and self.prefetched.epoch == epoch:
            batch, self.prefetched = self.prefetched, None
            return batch
        return self.finish(pending if pending is not None else self.launch(epoch))

    def publish(self, epoch: int, batch: EpochBatch, world_size: int) -> dict[str, float]:
        """Put the fresh batch in the replay buffer, pick this update's samples, hand each rank its shard."""
        learner_version = epoch - 1
        for c, (trajectory_ref, reference_ref) in enumerate(zip(batch.trajectory_refs, batch.reference_refs or [None] * len(batch.trajectory_refs))):
            self.chunk_refs[(batch.epoch, c)] = (trajectory_ref, reference_ref)
        self.replay.add(batch.entries())
        self.replay.evict(learner_version=learner_version)
        shard = self.cfg.learner.num_workers * self.cfg.learner.micro_batch_size
        # A multiple of what the learners split evenly, with whole accumulation windows.
        selected = self.replay.select(self.cfg.samples_per_update, multiple_of=shard * self.cfg.learner.gradient_accumulation_steps)
        self.replay.evict(learner_version=learner_version)
        shards = [shard_descriptor(selected, rows, self.chunk_refs) for rows in shard_rows(len(selected), world_size)]
        ray.get(self.hub.put.remote(epoch, shards))
        self.progress(epoch=epoch, phase="learn")
        # The store is fullest now: this batch, and in async mode the next one being sampled.
        self._store_peak = object_store_bytes()
        return {"replay/size": float(len(self.replay)), **staleness_stats(selected, learner_version=learner_version)}

    def release(self) -> None:
        """Drop the refs of chunks no buffered or prefetched entry needs (their objects leave the store)."""
        keep = self.replay.chunk_keys() | ({(self.prefetched.epoch, c) for c in range(len(self.prefetched.chunk_sizes))} if self.prefetched else set())
        self.chunk_refs = {key: refs for key, refs in self.chunk_refs.items() if key in keep}

    # -------------------------------------------------------------- sync, eval, metrics
    def sync(self, weights: dict[str, np.ndarray], version: int, *, wait: bool = True) -> tuple[float, int]:
        """Ship new trainable weights to the rollout actors: one ray.put, then each actor loads
        them now (``wait``) or, in async mode, before its next batch of ``version``."""
        started = time.perf_counter()
        self.weights_ref = ray.put(weights)
        self.policy_version = version
        if wait:
            ray.get([actor.set_weights.remote(self.weights_ref, version) for actor in self.pools.rollout.actors])
        return time.perf_counter() - started, int(sum(a.nbytes for a in weights.values()))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Sample the eval prompts with fixed seeds, score them, save an image grid."""
        from actors.images import make_grid, save_png

        per_prompt = 2
        prompts = [p for p in self.eval_prompts for _ in range(per_prompt)]
        seeds = [int(s) for s in np.random.SeedSequence([self.cfg.seed, 0, 2]).generate_state(len(prompts), dtype=np.uint32)]
        chunks = self._chunks(prompts, seeds)
        images = [self._sample_call(p, s, self.policy_version, self.weights_ref)[1] for p, s in chunks]
        scored = ray.get([self.pools.reward.next().score.remote(img, p, k) for k, (img, (p, _)) in enumerate(zip(images, chunks))])
        save_png(make_grid(np.concatenate(ray.get(images)), columns=per_prompt * 3), self.output_dir / "images" / f"epoch_{epoch:04d}.png")
        return {"eval/reward_mean": float(np.concatenate([s for s, _, _ in scored]).mean())}

    def record(self, epoch: int, batch: EpochBatch, learn_stats: dict[str, float], *, replay_stats: dict[str, float], learn_s: float,
               sync_s: float, sync_bytes: int, epoch_s: float, eval_metrics: dict[str, float]) -> dict[str, Any]:
        self.samples_seen += len(batch.prompts)
        pools = {"rollout": len(self.pools.rollout), "reward": len(self.pools.reward), "reference": len(self.pools.reference) if self.pools.reference else 0}
        idle = {f"idle/{name}_frac": max(0.0, 1.0 - batch.busy[name] / (epoch_s * count)) for name, count in pools.items() if count}
        idle["idle/learner_frac"] = max(0.0, 1.0 - learn_s / epoch_s)
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
            # Compute on the sync loop's critical path: sampling phase, learning, loading weights.
            "time/critical_path_s": batch.busy["critical"] + learn_s + batch.busy["load"],
            "throughput/samples_per_s": len(batch.prompts) / epoch_s,
            "sync/bytes": sync_bytes,
            "sync/load_s": batch.busy["load"],
            **{f"busy/{name}_s": batch.busy[name] for name in pools if pools[name]},
            "busy/learner_s": learn_s,
            **idle,
            "behaviour_version": batch.version,
            # Which prompts this epoch sampled, compactly: equal digests = equal prompt lists.
            "prompts/digest": zlib.crc32("\n".join(batch.prompts).encode("utf-8")),
            **{f"reward/{k}": v for k, v in batch.reward_info.items()},
            **batch.advantage_info,
            **replay_stats,
            **{k: v for k, v in learn_stats.items() if k not in ("kl/mean", "policy/clipfrac", "policy/approx_kl")},
            **eval_metrics,
        }
        metrics.update(memory_stats())
        metrics["memory/object_store_peak_bytes"] = max(self._store_peak, metrics["memory/object_store_bytes"])
        self.metrics.write(metrics)
        self.hub.add_summary.remote(metrics)
        return metrics

    # -------------------------------------------------------------- checkpoint state
    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "policy_version": self.policy_version,
            "samples_seen": self.samples_seen,
            "stat_tracker": self.tracker.state_dict(),
            "replay": {"entries": len(self.replay), "prefetched": self.prefetched.meta() if self.prefetched else None},
            # No generator state to save: every random stream (prompts, sampling noise,
            # learner shuffles, dropout) is derived from (seed, epoch, rank), so the epoch
            # counter restores them all.
            "rng": {"derived_from": ["seed", "epoch", "rank"], "seed": self.cfg.seed},
        }

    def prefetch(self, pending: Launched | None) -> None:
        """Before a checkpoint: finish the epoch sampled ahead, so it is saved with the buffer
        (a resumed run then trains on exactly the samples of the older weights)."""
        if pending is not None:
            self.prefetched = self.finish(pending)

    def _fetch_chunk(self, key: ChunkKey) -> tuple[Any, np.ndarray | None]:
        trajectory_ref, reference_ref = self.chunk_refs[key]
        return ray.get(trajectory_ref), (ray.get(reference_ref) if reference_ref is not None else None)

    def write_replay(self, directory: Path) -> None:
        write_replay(directory / REPLAY_FILE, self.replay.entries, self._fetch_chunk)
        if self.prefetched is not None:
            for c, refs in enumerate(zip(self.prefetched.trajectory_refs, self.prefetched.reference_refs or [None] * len(self.prefetched.chunk_sizes))):
                self.chunk_refs[(self.prefetched.epoch, c)] = refs
            write_replay(directory / PREFETCHED_FILE, self.prefetched.entries(), self._fetch_chunk)

    def _restore_replay(self, checkpoint: Path | None, state: dict[str, Any]) -> None:
        if checkpoint is None or not (checkpoint / REPLAY_FILE).is_file():
            return  # a checkpoint from before replay buffers: nothing was buffered
        entries, chunks = read_replay(checkpoint / REPLAY_FILE)
        if len(entries) != state["replay"]["entries"]:
            raise ValueError(f"{checkpoint / REPLAY_FILE} holds {len(entries)} samples but state.json says {state['replay']['entries']}; the checkpoint is damaged")
        self.replay.add(entries)
        for key, (trajectories, ref_means) in chunks.items():
            self.chunk_refs[key] = (ray.put(trajectories), ray.put(ref_means) if ref_means is not None else None)
        meta = state["replay"]["prefetched"]
        if meta is not None:
            entries, chunks = read_replay(checkpoint / PREFETCHED_FILE)
            keys = [(meta["epoch"], c) for c in range(len(meta["chunk_sizes"]))]
            self.prefetched = EpochBatch(
                epoch=meta["epoch"],
                version=meta["version"],
                trajectory_refs=[ray.put(chunks[k][0]) for k in keys],
                reference_refs=[ray.put(chunks[k][1]) for k in keys] if chunks[keys[0]][1] is not None else None,
                chunk_sizes=meta["chunk_sizes"],
                prompts=[e.prompt for e in entries],
                rewards=np.array([e.reward for e in entries], dtype=np.float32),
                advantages=np.array([e.advantage for e in entries], dtype=np.float32),
                reward_info=meta["reward_info"],
                advantage_info=meta["advantage_info"],
                timings=meta["timings"],
                busy=meta["busy"],
            )

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
        controller.write_replay(staged)
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
    state, start_epoch, resume_from = None, 0, None
    if loop_config["resume_from"]:
        resume_from = Path(loop_config["resume_from"])
        learner.engine.load_checkpoint(str(resume_from / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        state = ckpt.read_state(resume_from)
        start_epoch = state["epoch"]

    controller = Controller(cfg, output_dir, hub, state=state, checkpoint=resume_from) if rank == 0 else None
    weights = learner.trainable_state()
    asynchronous = cfg.train.mode == "async"
    if controller is not None:
        controller.sync(weights, version=start_epoch)
        if start_epoch == 0 and cfg.train.eval_every:
            controller.evaluate(0)

    pending: Launched | None = None
    try:
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            epoch_started = time.perf_counter()
            if controller is not None:
                batch = controller.next_batch(epoch, pending)
                # Async: the next epoch samples with the weights the learners are about to
                # update, while they update (one version of lag, corrected by IS weights).
                pending = controller.launch(epoch + 1) if asynchronous and epoch < cfg.train.epochs else None
                replay_stats = controller.publish(epoch, batch, world_size)
            shard, advantages, ref_means, versions = fetch_shard(ray.get(hub.get.remote(epoch, rank)))

            learn_started = time.perf_counter()
            stats = learner.train_epoch(shard, advantages, ref_means, epoch=epoch, versions=versions, learner_version=epoch - 1,
                                        is_truncation=cfg.replay.is_truncation)
            stats = _all_reduce_mean(stats, world_size)
            learn_s = time.perf_counter() - learn_started
            del shard, ref_means

            weights = learner.trainable_state()  # a collective under ZeRO-3
            checkpointing = epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs
            if controller is not None:
                sync_s, sync_bytes = controller.sync(weights, version=epoch, wait=not asynchronous)
                eval_metrics = controller.evaluate(epoch) if cfg.train.eval_every and (epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs) else {}
                if checkpointing:
                    controller.prefetch(pending)
                    pending = None
                controller.release()
                controller.record(epoch, batch, stats, replay_stats=replay_stats, learn_s=learn_s, sync_s=sync_s, sync_bytes=sync_bytes,
                                  epoch_s=time.perf_counter() - epoch_started, eval_metrics=eval_metrics)
                del batch
            if checkpointing:
                save_checkpoint(epoch=epoch, cfg=cfg, output_dir=output_dir, learner=learner, weights=weights, controller=controller, rank=rank, world_size=world_size)
    finally:
        if controller is not None:
            controller.close()
