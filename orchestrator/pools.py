"""Actor pools: resource checks, placement over nodes, start-up with a deadline, least-loaded dispatch.

Before anything starts, :func:`check_fits` compares what the config asks for with what
the cluster has and fails in seconds naming the pool that does not fit. Actors that
still cannot be scheduled (a node-local shortage the totals hide, a label no node has)
are caught by :meth:`Pools.wait_ready` waiting on them with a deadline, instead of hanging.

Work goes to whoever is free: :meth:`ActorPool.acquire` hands out the actor with the
fewest unfinished calls, waiting when all have ``limit`` of them, so a slow GPU or a busy
node gets fewer calls instead of holding up every epoch (round-robin would give it a
share of each epoch's work and make every epoch wait for it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.workers.reference import ReferenceWorker
from actors.workers.reward import RewardWorker
from actors.workers.rollout import RolloutWorker

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long actors may take to be scheduled and to load their model."""


@dataclasses.dataclass(frozen=True)
class Demand:
    pool: str
    count: int
    cpus: float
    gpus: float
    resources: dict[str, float] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        custom = "".join(f" + {amount:g} {name}" for name, amount in self.resources.items())
        return f"{self.pool} ({self.count} x {self.cpus:g} CPU{gpu}{custom})"


def demands(*, pools, learner, uses_reference: bool) -> list[Demand]:
    """What each pool asks for, learners first (they are the bulk on a GPU cluster)."""

    def pool_demand(name, pool):
        return Demand(name, pool.num_actors, pool.num_cpus, pool.num_gpus, dict(pool.resources))

    out = [
        Demand(
            "learner", learner.num_workers, learner.num_cpus_per_worker, learner.num_gpus_per_worker, dict(learner.resources_per_worker)
        ),
        pool_demand("rollout", pools.rollout),
        pool_demand("reward", pools.reward),
    ]
    if uses_reference and pools.reference.num_actors:
        out.append(pool_demand("reference", pools.reference))
    return out


def check_fits(wanted: list[Demand], available: dict[str, float]) -> None:
    """Raise ``ValueError`` naming the first pool that does not fit in ``available`` resources."""
    used: dict[str, float] = {}
    placed = []
    for demand in wanted:
        need = {"CPU": demand.count * demand.cpus, "GPU": demand.count * demand.gpus}
        need.update({name: demand.count * amount for name, amount in demand.resources.items()})
        short = [name for name, amount in need.items() if used.get(name, 0.0) + amount > float(available.get(name, 0)) + 1e-9]
        if short:
            before = ", ".join(d.describe() for d in placed) or "nothing"
            have = ", ".join(f"{float(available.get(name, 0)):g} {name}" for name in need)
            taken = ", ".join(f"{used.get(name, 0.0):g} {name}" for name in need)
            custom = [name for name in short if name not in ("CPU", "GPU")]
            hint = (
                f"; no node advertises enough {', '.join(custom)} (`ray start --resources`)"
                if custom
                else " (on one machine, `rayalign train --num-cpus N` sets the logical CPUs of the local cluster)"
                if "GPU" not in short
                else ""
            )
            raise ValueError(
                f"pool '{demand.pool}' does not fit: it needs {', '.join(f'{amount:g} {name}' for name, amount in need.items())} "
                f"({demand.describe()}), but the cluster has {have} in all, of which {before} already take {taken}. "
                f"Shrink pools.{demand.pool if demand.pool != 'learner' else '<pool>'} / learner resources "
                f"(fractions are allowed), or add nodes{hint}"
            )
        for name, amount in need.items():
            used[name] = used.get(name, 0.0) + amount
        placed.append(demand)


def threads_for(num_cpus: float) -> int:
    """torch threads for an actor reserving ``num_cpus`` logical CPUs (at least 1, at most the machine's)."""
    return max(1, min(int(round(num_cpus)), os.cpu_count() or 1))


class ActorPool:
    """The actors of one role, with the calls each has not finished yet.

    Thread-safe: the controller's feeder thread and its main thread both dispatch.
    """

    def __init__(self, name: str, actors: list[Any], *, placement_group: Any = None, round_robin: bool = False):
        self.name = name
        self.actors = actors
        self.placement_group = placement_group
        self.round_robin = round_robin
        self._unfinished: list[list[Any]] = [[] for _ in actors]
        self._calls = 0
        self._lock = threading.Condition()

    def __len__(self) -> int:
        return len(self.actors)

    def _refresh(self) -> None:
        pending = [ref for refs in self._unfinished for ref in refs]
        if not pending:
            return
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
        finished = set(done)
        self._unfinished = [[ref for ref in refs if ref not in finished] for refs in self._unfinished]

    def loads(self) -> list[int]:
        """Unfinished calls per actor."""
        with self._lock:
            self._refresh()
            return [len(refs) for refs in self._unfinished]

    def acquire(self, *, limit: int | None = None) -> int:
        """The index of the actor with the fewest unfinished calls (the lowest index among equals).

        With ``limit``, wait until some actor has fewer than ``limit`` unfinished calls: the
        caller hands work to whoever is free instead of queueing it behind a slow actor.
        """
        while True:
            with self._lock:
                self._refresh()
                loads = [len(refs) for refs in self._unfinished]
                # round_robin (pools.rollout.dispatch): actor i of n gets calls i, i + n, ... whatever their loads.
                best = self._calls % len(loads) if self.round_robin else min(range(len(loads)), key=lambda i: (loads[i], i))
                if limit is None or loads[best] < limit:
                    self._calls += 1
                    return best
                pending = [ref for refs in self._unfinished for ref in refs]
            ray.wait(pending, num_returns=1, fetch_local=False)

    def track(self, index: int, ref: Any) -> None:
        """Count ``ref`` (the call's completion) against actor ``index`` until it finishes."""
        with self._lock:
            self._unfinished[index].append(ref)

    def wait_ready(self, timeout_s: float) -> None:
        pending = {actor.__ray_ready__.remote(): i for i, actor in enumerate(self.actors)}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as error:
            # A constructor's user error (a bad model path on that node, say) reads as itself.
            said = [line for line in str(error).splitlines() if line.startswith("ValueError: ")]
            if said:
                raise ValueError(said[-1].removeprefix("ValueError: ")) from None
            raise
        if not_ready:
            raise ValueError(
                f"{len(not_ready)} of {len(self.actors)} '{self.name}' actors were not running after {timeout_s:.0f}s: "
                f"the cluster cannot schedule them (check `ray status`, and the pool's node_labels and resources) "
                f"or their model takes longer to load"
            )

    def restarts(self) -> list[int]:
        """How many times Ray has restarted each actor (from the GCS's actor table)."""
        return [restarts for restarts, _ in self.health()]

    def health(self) -> list[tuple[int, str]]:
        """Each actor's restart count and, once it has died, the cause of its last death (from the GCS's actor table)."""
        # Ray's public state API needs the dashboard, which rayalign does not start; the GCS table has both.
        table = [ray._private.state.actors(actor._actor_id.hex()) for actor in self.actors]
        return [(int(row.get("NumRestarts", 0)), death_cause(row.get("DeathCause"))) for row in table]

    def identities(self) -> list[tuple[str, int]]:
        """The node id each actor runs on, and its process id."""
        return ray.get([actor.identity.remote() for actor in self.actors])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


def death_cause(cause: Any) -> str:
    """One line from the GCS's record of why an actor died (a protobuf ``ActorDeathCause``)."""
    if cause is None:
        return ""
    for field in ("actor_died_error_context", "creation_task_failure_context", "runtime_env_failed_context", "oom_context"):
        if cause.HasField(field):
            context = getattr(cause, field)
            message = getattr(context, "error_message", "") or getattr(context, "formatted_exception_string", "")
            return " ".join(str(message).split())[:300] or field
    return " ".join(str(cause).split())[:300]


class RestartGuard:
    """Stops a pool actor that keeps dying: ``limit`` restarts in a row are allowed, one more is not.

    Ray restarts pool actors without limit (so a run on preemptible nodes survives any number of
    deaths spread over it); this thread watches each actor's restart count and, when it has grown
    by more than ``limit`` since the actor last finished a call (:meth:`settle`), kills the actor
    for good. Its unfinished calls then fail, and :meth:`cause` says why for the error the run
    stops with.
    """

    def __init__(self, pools: Pools, limit: int, *, interval_s: float = 1.0):
        self.pools = pools
        self.limit = limit
        self.interval_s = interval_s
        self._base = {pool.name: pool.restarts() for pool in pools.all()}
        self._stopped: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rayalign-restart-guard", daemon=True)

    def start(self) -> RestartGuard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def settle(self, pool: str, index: int, restarts: int) -> None:
        """Actor ``index`` of ``pool`` finished a call having been restarted ``restarts`` times: its run of deaths is over."""
        with self._lock:
            self._base[pool][index] = max(self._base[pool][index], restarts)

    def cause(self, pool: str, index: int) -> str | None:
        """Why the guard stopped that actor, or None if it did not."""
        with self._lock:
            return self._stopped.get((pool, index))

    def check(self) -> None:
        """One look at every actor's restart count; stops those past the limit."""
        for pool in self.pools.all():
            for index, (restarts, cause) in enumerate(pool.health()):
                with self._lock:
                    in_a_row = restarts - self._base[pool.name][index]
                    if in_a_row <= self.limit or (pool.name, index) in self._stopped:
                        continue
                    self._stopped[(pool.name, index)] = (
                        f"died {in_a_row} times in a row without finishing a call, more than pools.max_restarts = {self.limit} "
                        f"allows (its last death: {cause or 'cause unknown'})"
                    )
                logger.error("%s actor %d %s; stopping it", pool.name, index, self._stopped[(pool.name, index)])
                ray.kill(pool.actors[index], no_restart=True)

    def _watch(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the GCS briefly unreachable, say: look again next time
                logger.debug("restart guard: could not read the actor table", exc_info=True)


@dataclasses.dataclass
class Pools:
    rollout: ActorPool
    reward: ActorPool
    reference: ActorPool | None

    def all(self) -> list[ActorPool]:
        return [p for p in (self.rollout, self.reward, self.reference) if p is not None]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until every actor is up (its model loaded); a constructor's error is raised as itself."""
        for pool in self.all():
            pool.wait_ready(timeout_s)
        logger.info("pools up: %s", ", ".join(f"{p.name} x{len(p)}" for p in self.all()))

    def handles(self) -> dict[str, Any]:
        """What another process needs to use these pools (actor handles and placement groups pickle)."""
        return {p.name: {"actors": p.actors, "placement_group": p.placement_group, "round_robin": p.round_robin} for p in self.all()}

    @classmethod
    def from_handles(cls, handles: dict[str, Any]) -> Pools:
        pools = {
            name: ActorPool(name, h["actors"], placement_group=h["placement_group"], round_robin=h["round_robin"])
            for name, h in handles.items()
        }
        return cls(rollout=pools["rollout"], reward=pools["reward"], reference=pools.get("reference"))

    def actor_ids(self) -> set[str]:
        """Every pool actor's id (hex), to tell a pool actor's death from a learner's."""
        return {actor._actor_id.hex() for pool in self.all() for actor in pool.actors}

    def shutdown(self) -> None:
        for pool in self.all():
            pool.kill()


def _start(name: str, cls: type, pool, args_for: Any, *, max_restarts: int, round_robin: bool = False) -> ActorPool:
    """``pool.num_actors`` actors of ``cls`` laid out as ``pool.placement`` says; ``args_for(i)`` are actor i's arguments.

    A dead actor is restarted (on a live node, if its own is gone) and its unfinished calls run
    again: every call is a pure function of its arguments, so a re-run returns the same result.
    Ray restarts it without limit; the controller's :class:`RestartGuard` stops one that dies
    more than ``max_restarts`` times in a row. With ``max_restarts = 0`` Ray does not restart it.
    """
    options: dict[str, Any] = {
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "max_concurrency": 1,
        "max_restarts": -1 if max_restarts else 0,
        "max_task_retries": -1 if max_restarts else 0,
    }
    if pool.resources:
        options["resources"] = dict(pool.resources)
    if pool.node_labels:
        options["label_selector"] = dict(pool.node_labels)
    group = None
    if pool.placement == "pack":
        bundle = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
        group = placement_group([{k: v for k, v in bundle.items() if v}] * pool.num_actors, strategy="PACK", name=f"rayalign-{name}")
    remote = ray.remote(cls)
    actors = []
    for i in range(pool.num_actors):
        if group is not None:
            strategy: Any = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        else:
            # "DEFAULT" (or "SPREAD") also opts out of placement-group capture: inside a Ray Tune trial,
            # Ray Train's workers would otherwise squeeze the pools into the learner's own bundle.
            strategy = "SPREAD" if pool.placement == "spread" else "DEFAULT"
        args, kwargs = args_for(i)
        actors.append(remote.options(**options, scheduling_strategy=strategy).remote(*args, **kwargs))
    return ActorPool(name, actors, placement_group=group, round_robin=round_robin)


def create_pools(cfg, *, uses_reference: bool) -> Pools:
    """Create the rollout, reward and (if used) reference actors; returns at once, while they load
    their models (:meth:`Pools.wait_ready` waits for them)."""
    rollout_cfg = cfg.pools.rollout

    def rollout_args(i: int):
        slowdown = rollout_cfg.slowdown[i] if i < len(rollout_cfg.slowdown) else 1.0
        return (cfg.model, cfg.sampling), {"num_threads": threads_for(rollout_cfg.num_cpus), "slowdown": slowdown}

    restarts = cfg.pools.max_restarts
    rollout = _start(
        "rollout", RolloutWorker, rollout_cfg, rollout_args, max_restarts=restarts, round_robin=rollout_cfg.dispatch == "round_robin"
    )
    reward = _start(
        "reward",
        RewardWorker,
        cfg.pools.reward,
        lambda i: ((cfg.reward,), {"gold": cfg.train.gold_reward, "num_threads": threads_for(cfg.pools.reward.num_cpus)}),
        max_restarts=restarts,
    )
    reference = None
    if uses_reference and cfg.pools.reference.num_actors:
        reference = _start(
            "reference",
            ReferenceWorker,
            cfg.pools.reference,
            lambda i: ((cfg.model,), {"num_threads": threads_for(cfg.pools.reference.num_cpus)}),
            max_restarts=restarts,
        )
    return Pools(rollout=rollout, reward=reward, reference=reference)
