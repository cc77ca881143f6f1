"""ShardHub: a small named actor through which learner ranks receive ObjectRefs.

ObjectRefs must travel in-band (as actor-method arguments and return values): refs
pickled out-of-band through ``torch.distributed`` collectives hang the receiver (see
ARCHITECTURE.md). Rank 0 ``put``s each rank's shard descriptor (a dict of refs); every
rank ``get``s its own, waiting until it is there. The hub also hands rank 0 the actor pools
the driver started (so they load while the learner group forms), and carries progress and
epoch summaries for the driver.
"""

from __future__ import annotations

import asyncio
from typing import Any


class ShardHub:
    def __init__(self) -> None:
        self._shards: dict[tuple[int, int], Any] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._progress: dict[str, Any] = {}
        self._summaries: list[dict[str, Any]] = []
        self._pools: Any = None
        self._counted_restarts: dict[str, list[int]] = {}
        self._pools_set = asyncio.Event()

    def _event(self, epoch: int) -> asyncio.Event:
        return self._ready.setdefault(epoch, asyncio.Event())

    async def put(self, epoch: int, shards: list[Any]) -> None:
        """Publish one descriptor per rank for ``epoch`` (refs stay refs: they are nested)."""
        for rank, shard in enumerate(shards):
            self._shards[(epoch, rank)] = shard
        self._event(epoch).set()

    async def get(self, epoch: int, rank: int) -> Any:
        """This rank's descriptor for ``epoch``; waits until rank 0 has published it."""
        await self._event(epoch).wait()
        shard = self._shards.pop((epoch, rank))
        if not any(key[0] == epoch for key in self._shards):
            self._ready.pop(epoch, None)
        return shard

    async def reset(self) -> None:
        """Forget the shards of a learner group that failed (the next one publishes its own); keep the pools."""
        self._shards.clear()
        self._ready.clear()
        self._progress = {}

    async def set_pools(self, handles: Any) -> None:
        """The driver's pools (actor handles), for rank 0's controller."""
        self._pools = handles
        self._pools_set.set()

    async def get_pools(self) -> Any:
        await self._pools_set.wait()
        return self._pools

    async def set_counted_restarts(self, restarts: dict[str, list[int]]) -> None:
        """Pool actors' restart counts as of the last epoch's metrics: a restarted learner group
        counts the restarts after them (those of the epoch it lost included), not from its own start."""
        self._counted_restarts = dict(restarts)

    async def get_counted_restarts(self) -> dict[str, list[int]]:
        return self._counted_restarts

    async def set_progress(self, progress: dict[str, Any]) -> None:
        self._progress = dict(progress)

    async def add_summary(self, metrics: dict[str, Any]) -> None:
        self._summaries.append(metrics)

    async def poll(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Current progress and the epoch summaries not yet polled."""
        summaries, self._summaries = self._summaries, []
        return self._progress, summaries
