"""Actor pools: resource checks, start-up with a deadline, and round-robin dispatch.

Before anything starts, :func:`check_fits` compares what the config asks for with what
the cluster has and fails in seconds naming the pool that does not fit. Actors that
still cannot be scheduled (e.g. a node-local shortage the totals hide) are caught by
:func:`start_pools` waiting on them with a deadline, instead of hanging.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any

import ray

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long actors may take to be scheduled and to load their model."""


@dataclasses.dataclass(frozen=True)
class Demand:
    pool: str
    count: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.pool} ({self.count} x {self.cpus:g} CPU{gpu})"


def demands(*, pools, learner, uses_reference: bool) -> list[Demand]:
    """What each pool asks for, learners first (they are the bulk on a GPU cluster)."""
    out = [
        Demand("learner", learner.num_workers, learner.num_cpus_per_worker, learner.num_gpus_per_worker),
        Demand("rollout", pools.rollout.num_actors, pools.rollout.num_cpus, pools.rollout.num_gpus),
        Demand("reward", pools.reward.num_actors, pools.reward.num_cpus, pools.reward.num_gpus),
    ]
    if uses_reference and pools.reference.num_actors:
        out.append(Demand("reference", pools.reference.num_actors, pools.reference.num_cpus, pools.reference.num_gpus))
    return out


def check_fits(wanted: list[Demand], available: dict[str, float]) -> None:
    """Raise ``ValueError`` naming the first pool that does not fit in ``available`` resources."""
    have_cpu, have_gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    used_cpu = used_gpu = 0.0
    placed = []
    for demand in wanted:
        cpu, gpu = demand.count * demand.cpus, demand.count * demand.gpus
        if used_cpu + cpu > have_cpu + 1e-9 or used_gpu + gpu > have_gpu + 1e-9:
            before = ", ".join(d.describe() for d in placed) or "nothing"
            raise ValueError(
                f"pool '{demand.pool}' does not fit: it needs {cpu:g} CPU and {gpu:g} GPU ({demand.describe()}), "
                f"but the cluster has {have_cpu:g} CPU and {have_gpu:g} GPU in all, of which {before} already take "
                f"{used_cpu:g} CPU and {used_gpu:g} GPU. Shrink pools.{demand.pool if demand.pool != 'learner' else '<pool>'} / learner "
                f"resources (fractions are allowed), or add nodes"
                + (" (on one machine, `rayalign train --num-cpus N` sets the logical CPUs of the local cluster)" if gpu == 0 else "")
            )
        used_cpu, used_gpu = used_cpu + cpu, used_gpu + gpu
        placed.append(demand)


def threads_for(num_cpus: float) -> int:
    """torch threads for an actor reserving ``num_cpus`` logical CPUs (at least 1, at most the machine's)."""
    return max(1, min(int(round(num_cpus)), os.cpu_count() or 1))


class ActorPool:
    """A list of actors of one role, used round-robin."""

    def __init__(self, name: str, actors: list[Any]):
        self.name = name
        self.actors = actors
        self._cycle = itertools.cycle(actors)

    def next(self) -> Any:
        return next(self._cycle)

    def __len__(self) -> int:
        return len(self.actors)

    def wait_ready(self, timeout_s: float) -> None:
        pending = {actor.__ray_ready__.remote(): i for i, actor in enumerate(self.actors)}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        ray.get(ready)  # surfaces a constructor's exception (e.g. a bad model path) as itself
        if not_ready:
            raise ValueError(
                f"{len(not_ready)} of {len(self.actors)} '{self.name}' actors were not running after {timeout_s:.0f}s: "
                f"the cluster cannot schedule them (check `ray status`) or their model takes longer to load"
            )

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@dataclasses.dataclass
class Pools:
    rollout: ActorPool
    reward: ActorPool
    reference: ActorPool | None

    def all(self) -> list[ActorPool]:
        return [p for p in (self.rollout, self.reward, self.reference) if p is not None]

    def shutdown(self) -> None:
        for pool in self.all():
            pool.kill()


def start_pools(cfg, *, uses_reference: bool, timeout_s: float = START_TIMEOUT_S) -> Pools:
    """Start rollout, reward and (if used) reference actors and wait until all are up."""
    from actors.reference import ReferenceWorker
    from actors.reward_worker import RewardWorker
    from actors.rollout import RolloutWorker

    def options(pool):
        # "DEFAULT" opts out of placement-group capture. Inside a Ray Tune trial, Ray Train's
        # workers inherit the trial's capture of child tasks, so without it the pools would be
        # squeezed into the learner's own bundle, where they never fit, and wait forever.
        return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_concurrency": 1, "scheduling_strategy": "DEFAULT"}

    rollout_cls = ray.remote(RolloutWorker).options(**options(cfg.pools.rollout))
    reward_cls = ray.remote(RewardWorker).options(**options(cfg.pools.reward))
    rollout = ActorPool("rollout", [rollout_cls.remote(cfg.model, cfg.sampling, num_threads=threads_for(cfg.pools.rollout.num_cpus)) for _ in range(cfg.pools.rollout.num_actors)])
    reward = ActorPool("reward", [reward_cls.remote(cfg.reward, num_threads=threads_for(cfg.pools.reward.num_cpus)) for _ in range(cfg.pools.reward.num_actors)])
    reference = None
    if uses_reference and cfg.pools.reference.num_actors:
        reference_cls = ray.remote(ReferenceWorker).options(**options(cfg.pools.reference))
        reference = ActorPool("reference", [reference_cls.remote(cfg.model, num_threads=threads_for(cfg.pools.reference.num_cpus)) for _ in range(cfg.pools.reference.num_actors)])
    pools = Pools(rollout=rollout, reward=reward, reference=reference)
    try:
        for pool in pools.all():
            pool.wait_ready(timeout_s)
    except BaseException:
        pools.shutdown()
        raise
    logger.info("pools up: %s", ", ".join(f"{p.name} x{len(p)}" for p in pools.all()))
    return pools
