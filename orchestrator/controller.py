"""Rank 0's half of the RL loop: the actor pools, the replay buffer, weight sync, eval grids, metrics.

The controller moves ObjectRefs, never trajectory tensors: rollout actors return
trajectories and images as two objects; images go straight to reward actors,
trajectories straight to reference actors and (through the
:class:`~orchestrator.hub.ShardHub`) to the learners. What it computes from the small
results (advantages, shards, the metrics row) are the pure functions of
:mod:`orchestrator.epoch`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np
import ray

from actors.diffusion.images import grid_labels, make_labelled_grid, save_png
from actors.prompts import read_prompts
from actors.rl.advantages import PerPromptStatTracker
from orchestrator.config import Config
from orchestrator.epoch import (
    EpochBatch,
    compute_advantages,
    epoch_metrics,
    epoch_prompts,
    mean_info,
    sampling_busy,
    shard_descriptor,
    shard_rows,
)
from orchestrator.guards import GuardState, after_epoch
from orchestrator.metrics import MetricsWriter, memory_stats, object_store_bytes
from orchestrator.pools import Pools, RestartGuard
from orchestrator.replay import (
    ChunkKey,
    ReplayBuffer,
    read_replay,
    staleness_stats,
    write_replay,
)
from orchestrator.rundir import Checkpoint, RunDir

logger = logging.getLogger(__name__)


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


class Controller:
    """Rank 0's half of the loop: the pools, the replay buffer, advantages, weight sync, metrics and eval grids."""

    def __init__(self, cfg: Config, run: RunDir, hub, *, state: dict[str, Any] | None, checkpoint: Checkpoint | None = None):
        self.cfg = cfg
        self.run = run
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
        self.guards = GuardState.start(cfg.train)
        self._store_peak = 0.0
        self.incarnations: dict[tuple[str, int], int] = {}
        # The driver started the pools before the learner group (they load meanwhile); wait for them here.
        self.pools = Pools.from_handles(ray.get(hub.get_pools.remote()))
        started = time.perf_counter()
        self.pools.wait_ready()
        self.startup = {"time/startup/pools_wait_s": time.perf_counter() - started}
        identities = {pool.name: pool.identities() for pool in self.pools.all()}
        self.pool_nodes = {name: len({node for node, _ in actors}) for name, actors in identities.items()}
        # Each actor's process now: a call later answered by another process means the actor was restarted.
        self.incarnations.update({(name, i): pid for name, actors in identities.items() for i, (_, pid) in enumerate(actors)})
        self._restarts = {pool.name: pool.restarts() for pool in self.pools.all()}
        self._restarts.update(ray.get(hub.get_counted_restarts.remote()))  # a learner group before this one counted up to these
        self.guard = RestartGuard(self.pools, cfg.pools.max_restarts).start() if cfg.pools.max_restarts else None
        if state is not None:
            self.tracker.load_state_dict(state["stat_tracker"])
            self.samples_seen = state["samples_seen"]
            self.policy_version = state["policy_version"]
            if "guards" in state:  # a checkpoint written before the guards has none: beta starts from train.beta
                self.guards = GuardState.from_dict(state["guards"])
            self._restore_replay(checkpoint, state)
        self.metrics = MetricsWriter(run, resume_epoch=state["epoch"] if state else None)

    def progress(self, **fields) -> None:
        self.hub.set_progress.remote(fields)

    def _chunks(self, prompts: list[str], seeds: list[int]) -> list[tuple[list[str], list[int]]]:
        size = self.cfg.sampling.batch_size
        return [(prompts[i : i + size], seeds[i : i + size]) for i in range(0, len(prompts), size)]

    def _sample_call(self, prompts: list[str], seeds: list[int], version: int, weights: Any, *, limit: int | None = None):
        """(actor index, trajectories, images, timings refs) of one sampling batch with policy ``version``,
        whose weights are ``weights``, on the rollout actor with the fewest unfinished calls (waiting
        until one has fewer than ``limit``)."""
        pool = self.pools.rollout
        index = pool.acquire(limit=limit)
        trajectories, images, timing = pool.actors[index].sample.options(num_returns=3).remote(prompts, seeds, version, weights)
        pool.track(index, timing)
        return index, trajectories, images, timing

    def _score_call(self, images: Any, prompts: list[str], batch_index: int, *, gold: bool = False) -> tuple[int, Any]:
        pool = self.pools.reward
        index = pool.acquire()
        scored = pool.actors[index].score.remote(images, prompts, batch_index, gold=gold)
        pool.track(index, scored)
        return index, scored

    def _reference_call(self, trajectories: Any) -> tuple[int, Any, Any]:
        pool = self.pools.reference
        index = pool.acquire()
        means, timing = pool.actors[index].reference_means.options(num_returns=2).remote(trajectories)
        pool.track(index, timing)
        return index, means, timing

    def _known(self, pool: str, index: int) -> int | None:
        """The process id actor ``index`` of ``pool`` was last seen running as (None before its first call)."""
        return self.incarnations.get((pool, index))

    def _count_faults(self, observed: list[tuple[str, int, int | None, int]]) -> dict[str, float]:
        """Restarts of pool actors since the last count, and calls run again after one.

        ``observed`` is (pool, actor, pid it ran as when the call was sent, pid that answered) per
        call: a call answered by another process was run again after a restart (or waited for one).
        """
        retried = sum(1 for _, _, known, pid in observed if known is not None and pid != known)
        for pool, index, _, pid in observed:
            self.incarnations[(pool, index)] = pid
        restarts = {pool.name: pool.restarts() for pool in self.pools.all()}
        new = sum(
            max(0, now - before) for name, counts in restarts.items() for now, before in zip(counts, self._restarts.get(name, counts))
        )
        self._restarts = restarts
        if self.guard is not None:
            for pool, index, _, _ in observed:  # each of these finished a call: its run of deaths, if any, is over
                self.guard.settle(pool, index, restarts[pool][index])
        return {"faults/actor_restarts": float(new), "faults/retried_calls": float(retried)}

    def _get(self, refs: list[Any], pool: str, actors: list[int]) -> list[Any]:
        """``ray.get(refs)``, where call c ran on actor ``actors[c]`` of ``pool``; an actor that died more often than
        ``pools.max_restarts`` allows stops the run with an error naming it."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as error:
            for ref, index in zip(refs, actors):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    stopped = self.guard.cause(pool, index) if self.guard is not None else None
                    what = stopped or (
                        f"died and pools.max_restarts = 0 lets Ray restart no pool actor: {str(error).strip().splitlines()[0][:300]}"
                    )
                    raise ValueError(
                        f"{pool} actor {index} {what}. Resume the run with --resume once the cause is fixed or the cluster is "
                        "healthy; a larger pools.max_restarts tolerates more deaths in a row"
                    ) from error
            raise

    # -------------------------------------------------------------- sample, score, reference
    def launch(self, epoch: int) -> Launched:
        """Start sampling ``epoch`` with the current weights; returns at once."""
        cfg = self.cfg
        prompts, seeds = epoch_prompts(
            self.prompts, seed=cfg.seed, epoch=epoch, count=cfg.train.samples_per_epoch, per_prompt=cfg.train.samples_per_prompt
        )
        launched = Launched(
            epoch=epoch,
            version=self.policy_version,
            weights=self.weights_ref,
            prompts=prompts,
            chunks=self._chunks(prompts, seeds),
            started=time.perf_counter(),
        )
        launched.thread = threading.Thread(target=self._feed, args=(launched,), name=f"rayalign-rollout-{epoch}", daemon=True)
        launched.thread.start()
        return launched

    def _feed(self, launched: Launched) -> None:
        try:
            in_flight: list[Any] = []
            for index, (prompts, seeds) in enumerate(launched.chunks):
                if len(in_flight) >= self.cfg.replay.max_in_flight:
                    _, in_flight = ray.wait(in_flight, num_returns=1, fetch_local=False)
                # Work goes to whoever is free: the next chunk waits for a rollout actor with no unfinished call.
                actor, trajectories, images, timing = self._sample_call(prompts, seeds, launched.version, launched.weights, limit=1)
                reward_actor, scored = self._score_call(images, prompts, index)  # queued at once: Ray starts it as its input is ready
                call = {
                    "actor": actor,
                    "trajectories": trajectories,
                    "timing": timing,
                    "reward": scored,
                    "reward_actor": reward_actor,
                    # Which process each actor was when the call went out (a different one answering = a restart).
                    "known": {"rollout": self._known("rollout", actor), "reward": self._known("reward", reward_actor)},
                }
                if self.pools.reference:
                    call["reference_actor"], call["reference"], call["reference_timing"] = self._reference_call(trajectories)
                    call["known"]["reference"] = self._known("reference", call["reference_actor"])
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
        timing = self._get([c["timing"] for c in calls], "rollout", [c["actor"] for c in calls])
        scored = self._get([c["reward"] for c in calls], "reward", [c["reward_actor"] for c in calls])
        reward_s = time.perf_counter() - launched.started - rollout_s
        self.progress(epoch=epoch, phase="reference")
        reference_refs = [c["reference"] for c in calls] if self.pools.reference else None
        reference_timing = (
            self._get([c["reference_timing"] for c in calls], "reference", [c["reference_actor"] for c in calls])
            if self.pools.reference
            else []
        )
        reference_s = time.perf_counter() - launched.started - rollout_s - reward_s
        observed = [("rollout", c["actor"], c["known"]["rollout"], t["pid"]) for c, t in zip(calls, timing)]
        observed += [("reward", c["reward_actor"], c["known"]["reward"], s[2]["pid"]) for c, s in zip(calls, scored)]
        observed += [("reference", c["reference_actor"], c["known"]["reference"], t["pid"]) for c, t in zip(calls, reference_timing)]
        faults = self._count_faults(observed)

        prompts = launched.prompts
        rewards = np.concatenate([s for s, _, _ in scored])  # (samples,); NaN: dropped by reward.on_invalid
        advantages, advantage_info = compute_advantages(rewards, prompts, cfg.train, self.tracker)
        faults["faults/dropped_samples"] = float(np.isnan(rewards).sum())
        sizes = [len(p) for p, _ in launched.chunks]
        info = mean_info([i for _, i, _ in scored], sizes)
        busy = sampling_busy(
            timing,
            [c["actor"] for c in calls],
            [s["busy_s"] for _, _, s in scored],
            [t["busy_s"] for t in reference_timing],
            rollout_actors=len(self.pools.rollout),
        )
        return EpochBatch(
            epoch=epoch,
            version=launched.version,
            trajectory_refs=trajectory_refs,
            reference_refs=reference_refs,
            chunk_sizes=sizes,
            prompts=prompts,
            rewards=rewards,
            advantages=advantages,
            reward_info=info,
            advantage_info=advantage_info,
            timings={"time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/reference_s": reference_s},
            busy=busy,
            faults=faults,
            rollout_calls=np.bincount([c["actor"] for c in calls], minlength=len(self.pools.rollout)).tolist(),
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
        for c, (trajectory_ref, reference_ref) in enumerate(
            zip(batch.trajectory_refs, batch.reference_refs or [None] * len(batch.trajectory_refs))
        ):
            self.chunk_refs[(batch.epoch, c)] = (trajectory_ref, reference_ref)
        self.replay.add(batch.entries())
        self.replay.evict(learner_version=learner_version)
        shard = self.cfg.learner.num_workers * self.cfg.learner.micro_batch_size
        # A multiple of what the learners split evenly, with whole accumulation windows.
        selected = self.replay.select(self.cfg.samples_per_update, multiple_of=shard * self.cfg.learner.gradient_accumulation_steps)
        self.replay.evict(learner_version=learner_version)
        # DPOK's beta travels with each update: the controller adapts it (train.kl_target), the learners use it.
        shards = [
            {**shard_descriptor(selected, rows, self.chunk_refs), "beta": self.guards.beta}
            for rows in shard_rows(len(selected), world_size)
        ]
        ray.get(self.hub.put.remote(epoch, shards))
        self.progress(epoch=epoch, phase="learn")
        # The store is fullest now: this batch, and in async mode the next one being sampled.
        self._store_peak = object_store_bytes()
        return {"replay/size": float(len(self.replay)), **staleness_stats(selected, learner_version=learner_version)}

    def release(self) -> None:
        """Drop the refs of chunks no buffered or prefetched entry needs (their objects leave the store)."""
        keep = self.replay.chunk_keys() | (
            {(self.prefetched.epoch, c) for c in range(len(self.prefetched.chunk_sizes))} if self.prefetched else set()
        )
        self.chunk_refs = {key: refs for key, refs in self.chunk_refs.items() if key in keep}

    # -------------------------------------------------------------- sync, eval, metrics
    def sync(self, weights: dict[str, np.ndarray], version: int, *, wait: bool = True) -> tuple[float, int]:
        """Ship new trainable weights to the rollout actors: one ray.put, then each actor loads
        them now (``wait``) or, in async mode, before its next batch of ``version``."""
        started = time.perf_counter()
        self.weights_ref = ray.put(weights)
        self.policy_version = version
        if wait:
            actors = self.pools.rollout.actors
            self._get([actor.set_weights.remote(self.weights_ref, version) for actor in actors], "rollout", list(range(len(actors))))
        return time.perf_counter() - started, int(sum(a.nbytes for a in weights.values()))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Sample the eval prompts with fixed seeds, score them (and with the gold reward), save an image grid."""
        per_prompt = 2
        prompts = [p for p in self.eval_prompts for _ in range(per_prompt)]
        seeds = [int(s) for s in np.random.SeedSequence([self.cfg.seed, 0, 2]).generate_state(len(prompts), dtype=np.uint32)]
        chunks = self._chunks(prompts, seeds)
        images = [self._sample_call(p, s, self.policy_version, self.weights_ref)[2] for p, s in chunks]
        scored = ray.get([self._score_call(img, p, k)[1] for k, (img, (p, _)) in enumerate(zip(images, chunks))])
        gold = (
            ray.get([self._score_call(img, p, k, gold=True)[1] for k, (img, (p, _)) in enumerate(zip(images, chunks))])
            if self.cfg.train.gold_reward is not None
            else None
        )
        rewards = np.concatenate([s for s, _, _ in scored])  # (prompts * per_prompt,), grouped by prompt
        grid = self.run.image_grid(epoch)
        # One prompt per row, captioned, each image's reward under it.
        image = make_labelled_grid(np.concatenate(ray.get(images)), captions=self.eval_prompts, scores=rewards, columns=per_prompt)
        save_png(image, self.run.workdir / grid, text=grid_labels(self.eval_prompts, rewards))
        self.run.publish(grid)
        metrics = {"eval/reward_mean": float(rewards.mean())}
        if gold is not None:
            scores = np.concatenate([s for s, _, _ in gold])  # (prompts * per_prompt,); NaN: dropped by its on_invalid
            metrics["gold/mean"] = float(np.nanmean(scores))
            metrics["gold/std"] = float(np.nanstd(scores))
            metrics.update({f"gold/{key}": value for key, value in mean_info([i for _, i, _ in gold], [len(p) for p, _ in chunks]).items()})
        return metrics

    def watch(self, epoch: int, learn_stats: dict[str, float], eval_metrics: dict[str, float], *, checkpointed: bool) -> str | None:
        """The guards after ``epoch`` (:func:`orchestrator.guards.after_epoch`): adapt beta for the next update,
        keep the best checkpoint, and say why the run stops now (None: it goes on)."""
        gold = eval_metrics.get("gold/mean")
        self.guards = after_epoch(
            self.guards,
            self.cfg.train,
            epoch=epoch,
            kl=learn_stats.get("kl/mean", float("nan")),
            gold=gold if gold is not None and np.isfinite(gold) else None,
            checkpointed=checkpointed,
        )
        if self.guards.stopped_epoch == epoch:
            logger.info("early stop after epoch %d: %s", epoch, self.guards.reason)
            return self.guards.reason
        return None

    def record(
        self,
        epoch: int,
        batch: EpochBatch,
        learn_stats: dict[str, float],
        *,
        replay_stats: dict[str, float],
        learn_s: float,
        sync_s: float,
        sync_bytes: int,
        epoch_s: float,
        eval_metrics: dict[str, float],
    ) -> dict[str, Any]:
        """Write the epoch's metrics row (and hand it to the driver for its summary line)."""
        self.samples_seen += len(batch.prompts)
        pool_sizes = {
            "rollout": len(self.pools.rollout),
            "reward": len(self.pools.reward),
            "reference": len(self.pools.reference) if self.pools.reference else 0,
        }
        metrics = epoch_metrics(
            batch,
            learn_stats,
            policy_version=self.policy_version,
            samples_seen=self.samples_seen,
            pool_sizes=pool_sizes,
            replay_stats=replay_stats,
            learn_s=learn_s,
            sync_s=sync_s,
            sync_bytes=sync_bytes,
            epoch_s=epoch_s,
            eval_metrics=eval_metrics,
        )
        metrics.update({f"nodes/{name}": float(count) for name, count in self.pool_nodes.items()})
        metrics.update(self.startup)  # the first epoch of this process only: how long it took to get here
        self.startup = {}
        metrics.update(memory_stats())
        metrics["memory/object_store_peak_bytes"] = max(self._store_peak, metrics["memory/object_store_bytes"])
        self.metrics.write(metrics)
        return metrics

    def checkpointed(self) -> None:
        """The epoch just recorded is now checkpointed: a learner group restarted from here counts
        pool actor restarts from the counts its row reported (rows after it are written again)."""
        self.hub.set_counted_restarts.remote(self._restarts)

    def announce(self, metrics: dict[str, Any]) -> None:
        """Hand an epoch's metrics to the driver (its summary line, a sweep's report to Tune).

        Called once the epoch's checkpoint, if it takes one, is complete: Tune's scheduler may
        stop a trial at the report, and the checkpoint must not be the price of that.
        """
        self.hub.add_summary.remote(metrics)

    # -------------------------------------------------------------- checkpoint state
    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "policy_version": self.policy_version,
            "samples_seen": self.samples_seen,
            "stat_tracker": self.tracker.state_dict(),
            "guards": self.guards.to_dict(),  # beta for the next update, the best checkpoint, an early stop
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

    def write_replay(self, checkpoint: Checkpoint) -> None:
        write_replay(checkpoint.replay, self.replay.entries, self._fetch_chunk)
        if self.prefetched is not None:
            for c, refs in enumerate(
                zip(self.prefetched.trajectory_refs, self.prefetched.reference_refs or [None] * len(self.prefetched.chunk_sizes))
            ):
                self.chunk_refs[(self.prefetched.epoch, c)] = refs
            write_replay(checkpoint.prefetched, self.prefetched.entries(), self._fetch_chunk)

    def _restore_replay(self, checkpoint: Checkpoint | None, state: dict[str, Any]) -> None:
        if checkpoint is None or not checkpoint.replay.is_file():
            return  # a checkpoint from before replay buffers: nothing was buffered
        entries, chunks = read_replay(checkpoint.replay)
        if len(entries) != state["replay"]["entries"]:
            raise ValueError(
                f"{checkpoint.replay} holds {len(entries)} samples but state.json says {state['replay']['entries']}; "
                "the checkpoint is damaged"
            )
        self.replay.add(entries)
        for key, (trajectories, ref_means) in chunks.items():
            self.chunk_refs[key] = (ray.put(trajectories), ray.put(ref_means) if ref_means is not None else None)
        meta = state["replay"]["prefetched"]
        if meta is not None:
            entries, chunks = read_replay(checkpoint.prefetched)
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
                faults=meta.get("faults", {}),
                rollout_calls=meta.get("rollout_calls", []),
            )

    def close(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        self.metrics.close()  # the pools are the driver's: it stops them when the run ends
