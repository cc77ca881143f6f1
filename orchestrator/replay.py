"""ReplayBuffer: versioned trajectories between the reward pool and the learners.

Every epoch's fresh samples enter the buffer with the policy version that sampled them.
Each update then trains on up to ``replay.samples_per_update`` entries, newest first
(by version, then epoch; a batch keeps its order, so sync mode with the defaults trains
on exactly the fresh batch as plain DDPO does). An entry leaves the buffer when

- it is older than ``max_staleness`` versions behind the learner (eviction by age),
- it has been trained on ``max_reuse`` times, or
- the buffer is over ``capacity`` (the oldest go first).

The buffer holds small records only; the trajectory arrays stay in Ray's object store,
one object per sampling batch ("chunk"), found by the entry's ``(epoch, chunk)`` key.
:func:`write_replay` / :func:`read_replay` persist entries *with* their arrays in a
Parquet file, so a resumed run trains on bit-identical data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.diffusion.trajectory import Trajectories
from actors.storage import Location

ChunkKey = tuple[int, int]
"""(epoch, chunk): one rollout call's output, the unit the object store holds."""


@dataclasses.dataclass(frozen=True)
class ReplayEntry:
    """One trajectory in the buffer (its arrays live in the chunk ``(epoch, chunk)``)."""

    epoch: int
    """Epoch whose rollouts produced it."""
    index: int
    """Position in that epoch's batch."""
    chunk: int
    """Which sampling batch of the epoch holds its arrays."""
    row: int
    """Its row within that chunk."""
    version: int
    """Policy version that sampled it (the behaviour policy)."""
    prompt: str
    reward: float
    advantage: float
    """Computed once, when the sample was scored, and kept for every reuse."""
    uses: int = 0
    """Times it has been trained on."""

    @property
    def key(self) -> ChunkKey:
        return (self.epoch, self.chunk)


class ReplayBuffer:
    """Entries in insertion order, with capacity, staleness and reuse limits."""

    def __init__(self, *, capacity: int, max_staleness: int, max_reuse: int) -> None:
        for name, value, low in (("capacity", capacity, 1), ("max_staleness", max_staleness, 0), ("max_reuse", max_reuse, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.max_reuse = max_reuse
        self.entries: list[ReplayEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Sequence[ReplayEntry]) -> None:
        self.entries.extend(entries)

    def evict(self, *, learner_version: int) -> list[ReplayEntry]:
        """Drop stale and used-up entries, then the oldest beyond capacity; returns what left."""
        keep, gone = [], []
        for entry in self.entries:
            too_old = learner_version - entry.version > self.max_staleness
            (gone if too_old or entry.uses >= self.max_reuse else keep).append(entry)
        if len(keep) > self.capacity:
            # Oldest version first, then earliest inserted: sorted() is stable.
            by_age = sorted(range(len(keep)), key=lambda i: keep[i].version)
            drop = set(by_age[: len(keep) - self.capacity])
            gone += [keep[i] for i in sorted(drop)]
            keep = [entry for i, entry in enumerate(keep) if i not in drop]
        self.entries = keep
        return gone

    def select(self, count: int, *, multiple_of: int = 1) -> list[ReplayEntry]:
        """Up to ``count`` entries to train on (fewer while the buffer fills, a multiple of
        ``multiple_of``), newest first; their ``uses`` go up by one.

        Newest means highest policy version, then latest epoch; within an epoch the batch
        keeps its order. Call :meth:`evict` first: every entry left is then trainable.
        """
        take = min(count, len(self.entries)) // multiple_of * multiple_of
        if take == 0:
            raise ValueError(
                f"the replay buffer holds {len(self.entries)} trainable samples but an update needs a multiple of {multiple_of}; "
                f"raise replay.max_staleness or replay.max_reuse, or make train.samples_per_epoch a multiple of {multiple_of}"
            )
        chosen = sorted(range(len(self.entries)), key=lambda i: (-self.entries[i].version, -self.entries[i].epoch, i))[:take]
        picked = [self.entries[i] for i in chosen]
        used = {i: dataclasses.replace(self.entries[i], uses=self.entries[i].uses + 1) for i in chosen}
        self.entries = [used.get(i, entry) for i, entry in enumerate(self.entries)]
        return picked

    def chunk_keys(self) -> set[ChunkKey]:
        """Chunks still needed by some entry (the others can leave the object store)."""
        return {entry.key for entry in self.entries}


def staleness_stats(entries: Sequence[ReplayEntry], *, learner_version: int) -> dict[str, float]:
    """How many versions behind the learner the trained samples are."""
    lag = np.array([learner_version - entry.version for entry in entries], dtype=np.float64)
    return {
        "replay/staleness_mean": float(lag.mean()) if lag.size else 0.0,
        "replay/staleness_max": float(lag.max()) if lag.size else 0.0,
    }


# --------------------------------------------------------------------------- persistence

_PER_SAMPLE = ("latents", "log_probs", "prompt_embeds", "pooled_prompt_embeds")
_SHARED = ("timesteps", "prev_timesteps", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
_OPTIONAL = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
"""Arrays only some families have (SDXL's and SD3's pooled embeddings): a null cell where absent, and
no column at all in files written before they were saved."""


def write_replay(
    path: str | os.PathLike | Location, entries: Sequence[ReplayEntry], fetch: Callable[[ChunkKey], tuple[Trajectories, np.ndarray | None]]
) -> int:
    """Write ``entries`` and their arrays (from ``fetch(chunk key)``) to one Parquet file.

    Arrays are stored as their raw bytes, with dtype and shape in the schema metadata,
    so :func:`read_replay` gives back bit-identical arrays. Returns the rows written.
    """

    columns: dict[str, list[Any]] = {f.name: [] for f in dataclasses.fields(ReplayEntry)}
    columns.update(
        {
            name: []
            for name in (
                *_PER_SAMPLE,
                *_SHARED,
                "ref_means",
                "seed",
                "guidance_scale",
                "eta",
                "num_inference_steps",
                "first_step",
                "chunk_version",
            )
        }
    )
    layout: dict[str, Any] = {}
    cache: dict[ChunkKey, tuple[Trajectories, np.ndarray | None]] = {}
    for entry in entries:
        if entry.key not in cache:
            cache[entry.key] = fetch(entry.key)
        trajectories, ref_means = cache[entry.key]
        for field in dataclasses.fields(ReplayEntry):
            columns[field.name].append(getattr(entry, field.name))
        per_sample = {name: getattr(trajectories, name) for name in _PER_SAMPLE}
        arrays = {name: None if array is None else array[entry.row] for name, array in per_sample.items()}
        arrays.update({name: getattr(trajectories, name) for name in _SHARED})
        arrays["ref_means"] = ref_means[entry.row] if ref_means is not None else None
        for name, array in arrays.items():
            if array is None:
                columns[name].append(None)
                continue
            array = np.ascontiguousarray(array)
            spec = {"dtype": array.dtype.str, "shape": list(array.shape)}
            if layout.setdefault(name, spec) != spec:
                raise ValueError(
                    f"replay entries disagree on the layout of {name}: {layout[name]} vs {spec}; one run's samples must share it"
                )
            columns[name].append(array.tobytes())
        columns["seed"].append(int(trajectories.seeds[entry.row]))
        columns["guidance_scale"].append(float(trajectories.guidance_scale))
        columns["eta"].append(float(trajectories.eta))
        columns["num_inference_steps"].append(int(trajectories.num_inference_steps))
        columns["first_step"].append(int(trajectories.first_step))
        columns["chunk_version"].append(int(trajectories.policy_version))
    schema = pa.schema(
        [
            pa.field(f.name, pa.string() if f.name == "prompt" else pa.float64() if f.type == "float" else pa.int64())
            for f in dataclasses.fields(ReplayEntry)
        ]
        + [pa.field(name, pa.binary()) for name in (*_PER_SAMPLE, *_SHARED, "ref_means")]
        + [
            pa.field("seed", pa.int64()),
            pa.field("guidance_scale", pa.float64()),
            pa.field("eta", pa.float64()),
            pa.field("num_inference_steps", pa.int64()),
            pa.field("first_step", pa.int64()),
            pa.field("chunk_version", pa.int64()),
        ],
        metadata={"rayalign.replay": json.dumps({"layout": layout, "format": 1})},
    )
    table = pa.table({name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}, schema=schema)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    Location(path).write_bytes(buffer.getvalue().to_pybytes())  # one object, written whole
    return table.num_rows


def read_replay(path: str | os.PathLike | Location) -> tuple[list[ReplayEntry], dict[ChunkKey, tuple[Trajectories, np.ndarray | None]]]:
    """Entries and rebuilt chunks from :func:`write_replay`'s file.

    Each rebuilt chunk holds only the rows that were saved, in the order they were
    saved; the entries' ``row`` fields are renumbered to point into it.
    """

    table = pq.read_table(pa.BufferReader(Location(path).read_bytes()))
    meta = json.loads(table.schema.metadata[b"rayalign.replay"])
    layout = meta["layout"]
    data = table.to_pydict()

    def array(name: str, i: int) -> np.ndarray | None:
        if name in _OPTIONAL and name not in data:
            return None
        raw = data[name][i]
        if raw is None:
            return None
        spec = layout[name]
        return np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()

    def stacked(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        # one chunk comes from one policy: its rows all have an optional array, or none has
        return None if arrays[0] is None else np.stack(arrays)

    rows_of: dict[ChunkKey, list[int]] = {}
    entries = []
    for i in range(table.num_rows):
        key = (data["epoch"][i], data["chunk"][i])
        rows = rows_of.setdefault(key, [])
        entries.append(ReplayEntry(**{f.name: data[f.name][i] for f in dataclasses.fields(ReplayEntry)} | {"row": len(rows)}))
        rows.append(i)
    chunks = {}
    for key, rows in rows_of.items():
        first = rows[0]
        per_sample = {name: stacked([array(name, i) for i in rows]) for name in _PER_SAMPLE}
        trajectories = Trajectories(
            prompts=[data["prompt"][i] for i in rows],
            **per_sample,
            **{name: array(name, first) for name in _SHARED},
            seeds=np.array([data["seed"][i] for i in rows], dtype=np.int64),
            guidance_scale=data["guidance_scale"][first],
            eta=data["eta"][first],
            num_inference_steps=data["num_inference_steps"][first],
            # files written before SDE windows recorded every step
            first_step=data["first_step"][first] if "first_step" in data else 0,
            policy_version=data["chunk_version"][first],
        )
        refs = [array("ref_means", i) for i in rows]
        chunks[key] = (trajectories, np.stack(refs) if refs[0] is not None else None)
    return entries, chunks
