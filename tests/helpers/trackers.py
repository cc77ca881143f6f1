"""Read back what the experiment trackers wrote, offline, with each tool's own record types.

W&B keeps an offline run in a ``.wandb`` file: LevelDB's log format (32 KiB blocks of records,
each a CRC-32, a length, a FULL/FIRST/MIDDLE/LAST type and its bytes) around W&B's own
protobuf ``Record`` (``wandb.proto.wandb_internal_pb2``). wandb 0.2x no longer ships a Python
reader of its files (its Go core reads them), so :func:`wandb_records` walks the blocks itself and
leaves the decoding to W&B's protobuf. TensorBoard event files are TFRecords of tensorboardX's
``Event`` protobuf; MLflow is read through its own client.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from tensorboardX.proto.event_pb2 import Event
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # checksum (uint32), length (uint16), type (uint8)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_tracker_env(monkeypatch, tmp_path: Path) -> None:
    """W&B offline with its config and caches under ``tmp_path``; MLflow and W&B on their defaults otherwise."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B would wrap pytest's captured stdout
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing here may reach the network
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def wandb_records(path: Path) -> Iterator[Any]:
    """Every ``Record`` of one ``.wandb`` file, in order; a checksum that does not match fails."""
    data = path.read_bytes()
    ident, _magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and version == 0, f"{path} is not a W&B log ({ident!r}, version {version})"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header is zero padding
            position += BLOCK - position % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        payload = data[position + HEADER : position + HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {position}"
        position += HEADER + length
        if kind in (FIRST, MIDDLE):
            pending += payload
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + payload if kind == LAST else payload)
        pending = b""
        yield record


def wandb_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of one W&B run, oldest first (an offline run writes one per process that resumed it).

    Each process writes ``offline-run-<time>-<id>``; one that starts in the same second as the last adds ``-1``,
    ``-2``, ... to that folder's name, so the order is by time and then by that count.
    """
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = []
    for path in wandb_dir.glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"):
        match = pattern.fullmatch(path.parent.name)
        if match:
            found.append(((match[1], int(match[2] or 0)), path))
    return [path for _, path in sorted(found)]


def wandb_history(files: list[Path]) -> list[tuple[int, dict[str, Any]]]:
    """Every history row of a W&B run as (step, values), in the order logged: a step logged twice shows twice."""
    rows = []
    for path in files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.append((record.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")}))
    return rows


def wandb_config(files: list[Path]) -> dict[str, Any]:
    """A W&B run's config as its last records left it (the run record's, then every update)."""
    config: dict[str, Any] = {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
            for item in updates:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tensorboard_events(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """Scalars ``{tag: [(step, value), ...]}`` and image steps ``{tag: [step, ...]}`` of every event file in ``logdir``."""
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    images: dict[str, list[int]] = defaultdict(list)
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):  # TFRecord: length (uint64), its CRC, the bytes, their CRC
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = Event()
            event.ParseFromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images[value.tag].append(event.step)
                elif value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars), dict(images)


def mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of an MLflow run: ``{key: [(step, value), ...]}`` in the order logged."""
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


def mlflow_image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged by ``log_image`` (MLflow names each file ``<key>+step+<N>+...``)."""
    stored = key.replace("/", "~")  # how MLflow spells a key's "/" in a file name
    names = [artifact.path.rsplit("/", 1)[-1] for artifact in client.list_artifacts(run_id, "images")]
    images = [name for name in names if name.startswith(f"{stored}+step+") and name.endswith(".png")]  # not the .webp thumbnails
    return sorted(int(name.split("+step+")[1].split("+")[0]) for name in images)
