"""One epoch's bookkeeping as pure functions: prompts, advantages, shards and metrics.

Nothing here needs Ray. The controller (:mod:`orchestrator.controller`) gathers an
epoch's rewards and timings from the pools; these functions turn them into the advantages
the learners train on, each learner rank's shard, and the metrics row of the epoch.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import numpy as np

from actors.rl.advantages import (
    PerPromptStatTracker,
    batch_normalize,
    clip_advantages,
    group_normalize,
)
from orchestrator.config import TrainConfig
from orchestrator.replay import ChunkKey, ReplayEntry


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


def compute_advantages(
    rewards: np.ndarray, prompts: Sequence[str], train: TrainConfig, tracker: PerPromptStatTracker
) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages of one epoch's samples under ``train.advantage``, clipped to ±``adv_clip_max``.

    "per_prompt" updates ``tracker`` (running statistics across epochs); "group" normalises
    within each prompt's ``samples_per_prompt`` consecutive samples; "batch" over the epoch.
    Returns float32 advantages and diagnostics (groups whose rewards were all equal).
    """
    dropped = np.isnan(rewards)
    if dropped.any():
        # reward.on_invalid: drop. The valid samples get their advantages as if the others were
        # not there; the dropped ones 0, which leaves them out of the update.
        if dropped.all():
            raise ValueError(
                "every sample of the epoch was dropped (reward.on_invalid: drop): the reward failed on all of them; "
                "see the reward actors' warnings for why"
            )
        keep = np.flatnonzero(~dropped)
        if train.advantage == "group":
            # Whole groups stay together: a group keeps its valid members.
            groups = (np.arange(len(prompts)) // train.samples_per_prompt)[keep]
            valid, zero_spread = group_normalize(rewards[keep], groups.tolist())
            info = {
                "advantages/zero_spread_groups": float(zero_spread),
                "advantages/zero_spread_frac": float(zero_spread) / len(set(groups)),
            }
        else:
            valid, info = compute_advantages(rewards[keep], [prompts[i] for i in keep], train, tracker)
        advantages = np.zeros(len(rewards), dtype=np.float32)
        advantages[keep] = clip_advantages(valid, train.adv_clip_max)
        return advantages, info
    info: dict[str, float] = {}
    if train.advantage == "per_prompt":
        advantages = tracker.update(list(prompts), rewards)
    elif train.advantage == "group":
        groups = np.arange(len(prompts)) // train.samples_per_prompt
        advantages, zero_spread = group_normalize(rewards, groups.tolist())
        # Groups whose samples all scored the same teach nothing this epoch.
        info["advantages/zero_spread_groups"] = float(zero_spread)
        info["advantages/zero_spread_frac"] = float(zero_spread) / (len(prompts) // train.samples_per_prompt)
    else:
        advantages = batch_normalize(rewards)
    return clip_advantages(advantages, train.adv_clip_max).astype(np.float32), info


def mean_info(infos: Sequence[dict[str, float]], sizes: Sequence[int]) -> dict[str, float]:
    """The per-batch means of a reward's diagnostics (``infos[b]`` of a batch of ``sizes[b]`` images) as
    means over all images; a batch without a key (dropped whole) does not count towards it."""
    keys = dict.fromkeys(key for info in infos for key in info)
    return {
        key: float(np.average([info[key] for info in infos if key in info], weights=[n for n, info in zip(sizes, infos) if key in info]))
        for key in keys
    }


def sampling_busy(
    rollout_timings: Sequence[dict[str, float]],
    rollout_actor_of_call: Sequence[int],
    reward_seconds: Sequence[float],
    reference_seconds: Sequence[float],
    *,
    rollout_actors: int,
) -> dict[str, float]:
    """Compute seconds per pool in the sampling phase, per rollout actor ("rollout/<i>"), and the critical path.

    Call c ran on rollout actor ``rollout_actor_of_call[c]``. The critical path is the busiest
    rollout actor plus the last chunk's reward and reference calls; "load" is the longest time
    an actor spent loading new weights.
    """
    per_actor = [0.0] * rollout_actors
    for timing, actor in zip(rollout_timings, rollout_actor_of_call):
        per_actor[actor] += timing["busy_s"]
    return {
        **{f"rollout/{a}": float(seconds) for a, seconds in enumerate(per_actor)},
        "rollout": float(sum(per_actor)),
        "reward": float(sum(reward_seconds)),
        "reference": float(sum(reference_seconds)),
        "load": float(max(t["load_s"] for t in rollout_timings)),
        "critical": float(max(per_actor) + reward_seconds[-1] + (reference_seconds[-1] if reference_seconds else 0.0)),
    }


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
    faults: dict[str, float] = dataclasses.field(default_factory=dict)
    """Pool actors restarted while sampling this batch and calls run again (``faults/*``)."""
    rollout_calls: list[int] = dataclasses.field(default_factory=list)
    """Sampling calls each rollout actor ran for this batch (the chunks it was dispatched)."""

    def entries(self) -> list[ReplayEntry]:
        rows = [(c, r) for c, size in enumerate(self.chunk_sizes) for r in range(size)]
        return [
            ReplayEntry(
                epoch=self.epoch,
                index=i,
                chunk=c,
                row=r,
                version=self.version,
                prompt=self.prompts[i],
                reward=float(self.rewards[i]),
                advantage=float(self.advantages[i]),
            )
            for i, (c, r) in enumerate(rows)
        ]

    def meta(self) -> dict[str, Any]:
        """The JSON-able rest of the batch (its samples are saved as replay rows)."""
        return {
            "epoch": self.epoch,
            "version": self.version,
            "chunk_sizes": self.chunk_sizes,
            "reward_info": self.reward_info,
            "advantage_info": self.advantage_info,
            "timings": self.timings,
            "busy": self.busy,
            "faults": self.faults,
            "rollout_calls": self.rollout_calls,
        }


def shard_rows(total: int, world_size: int) -> list[range]:
    """Contiguous global sample indices of each learner rank."""
    per_rank = total // world_size
    return [range(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


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


_LEARN_HEADLINE = ("kl/mean", "policy/clipfrac", "policy/approx_kl")


def epoch_metrics(
    batch: EpochBatch,
    learn_stats: dict[str, float],
    *,
    policy_version: int,
    samples_seen: int,
    pool_sizes: dict[str, int],
    replay_stats: dict[str, float],
    learn_s: float,
    sync_s: float,
    sync_bytes: int,
    epoch_s: float,
    eval_metrics: dict[str, float],
) -> dict[str, Any]:
    """The metrics row of one epoch (``metrics.jsonl``), without the memory readings.

    ``pool_sizes`` are the actors per pool ("rollout", "reward", "reference"; 0 = no pool);
    ``learn_stats`` what the learners averaged (KL, clip fraction, IS statistics, ...).
    """
    pools = {name: count for name, count in pool_sizes.items() if count}
    idle = {f"idle/{name}_frac": max(0.0, 1.0 - batch.busy[name] / (epoch_s * count)) for name, count in pools.items()}
    idle["idle/learner_frac"] = max(0.0, 1.0 - learn_s / epoch_s)
    # Each rollout actor's share: with least-loaded dispatch a slow actor is busy as long as the others, with fewer calls.
    per_actor = {key: seconds for key, seconds in batch.busy.items() if key.startswith("rollout/")}
    idle.update({f"idle/{key}_frac": max(0.0, 1.0 - seconds / epoch_s) for key, seconds in per_actor.items()})
    return {
        "epoch": batch.epoch,
        "policy_version": policy_version,
        "samples": samples_seen,
        "reward/mean": float(np.nanmean(batch.rewards)),  # NaN: a sample reward.on_invalid dropped
        "reward/std": float(np.nanstd(batch.rewards)),
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
        **{f"busy/{name}_s": batch.busy[name] for name in pools},
        **{f"busy/{key}_s": seconds for key, seconds in per_actor.items()},
        **{f"calls/rollout/{a}": float(count) for a, count in enumerate(batch.rollout_calls)},
        "busy/learner_s": learn_s,
        **idle,
        "behaviour_version": batch.version,
        "faults/actor_restarts": batch.faults.get("faults/actor_restarts", 0.0),
        "faults/retried_calls": batch.faults.get("faults/retried_calls", 0.0),
        "faults/dropped_samples": batch.faults.get("faults/dropped_samples", 0.0),
        "faults/learner_restarts": 0.0,  # the first epoch after a restart says otherwise (its startup metrics)
        "faults/recovery_s": 0.0,
        # Which prompts this epoch sampled, compactly: equal digests = equal prompt lists.
        "prompts/digest": zlib.crc32("\n".join(batch.prompts).encode("utf-8")),
        **{f"reward/{k}": v for k, v in batch.reward_info.items()},
        **batch.advantage_info,
        **replay_stats,
        **{k: v for k, v in learn_stats.items() if k not in _LEARN_HEADLINE},
        **eval_metrics,
    }
