"""``rayalign bench faults``: inject faults into short real runs and check that each one recovers.

Every row is one run of the preset for a few epochs, on a Ray cluster started on this machine
(the faults kill real processes, found by the title Ray gives each actor's process, so they
must run where this command runs), compared with an undisturbed run of the same config:

- a process fault (a rollout actor killed in the middle of a sampling call, a reward or a
  reference actor killed, a learner killed once the first checkpoint is complete) must leave
  the run as it was: the same samples and rewards per epoch and the same final weights;
- a reward that returns NaN must stop the run with the error that names it (``on_invalid:
  error``), or go on with those samples dropped and counted (``on_invalid: drop``).

Per row: recovered, seconds lost to the fault (the run's extra wall time over the undisturbed
one), samples lost and duplicated (from the per-epoch sample counters and prompt digests),
final weights equal to the undisturbed run's. Written as a table and, with ``--output``, JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import psutil
import ray
from safetensors.numpy import load_file

from jobs.bench import config_of, json_output, workdir_of, write_report
from jobs.bench.judge import Judge
from jobs.bench.s3 import BUCKET, S3Server, free_port
from orchestrator.cluster import connect
from orchestrator.config import Config, config_to_yaml, load_config, replace, to_dict
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import COMPLETE, LATEST, RunDir, checkpoint_name

SAMPLING = "ray::RolloutWorker.sample"
"""The title of a rollout actor's process while it runs a sampling call."""
LEARNER = "ray::RayTrainWorker"
"""The title of a learner's process (a Ray Train worker)."""


def nan_for_a_quarter(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Any]) -> tuple[np.ndarray, dict]:
    """A reward that breaks on about a quarter of the prompts (those whose CRC-32 is divisible by 4), whatever
    batch they come in: NaN for their images, the mean brightness for the others."""
    scores = images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0  # (batch,)
    scores[[zlib.crc32(prompt.encode("utf-8")) % 4 == 0 for prompt in prompts]] = np.nan
    return scores, {}


BROKEN_REWARD = "jobs.bench.faults:nan_for_a_quarter"


def find_process(title: str, *, spare: set[int] = frozenset(), timeout_s: float = 300.0, give_up: Callable[[], bool] | None = None) -> int:
    """The pid of the first process of this machine whose title starts with ``title`` (pid not in ``spare``), once there is one.

    ``TimeoutError`` after ``timeout_s``, or as soon as ``give_up()`` is true.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (give_up and give_up()):
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].startswith(title) and process.pid not in spare:
                return process.pid
        time.sleep(0.01)
    raise TimeoutError(f"no process titled {title!r} appeared within {timeout_s:.0f} s")


def kill_process(title: str, *, spare: set[int] = frozenset(), timeout_s: float = 300.0, give_up: Callable[[], bool] | None = None) -> int:
    """SIGKILL the first process of this machine whose title starts with ``title`` (pid not in ``spare``)."""
    pid = find_process(title, spare=spare, timeout_s=timeout_s, give_up=give_up)
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_while_checkpointing(epoch: int, title: str = LEARNER, *, timeout_s: float = 600.0) -> Callable[[Path], int]:
    """A fault that SIGKILLs the learner (rank 0, which writes checkpoints) while checkpoint ``epoch`` of a local run
    is being written: its folder there, its ``COMPLETE`` marker not yet. ``RuntimeError`` if the write finished first."""

    def inject(run: Path) -> int:
        checkpoint = Path(RunDir(run).checkpoint(epoch).location.path)
        marker = checkpoint / COMPLETE
        wait_for_checkpoint(run, epoch - 1, timeout_s=timeout_s)
        pid = find_process(title, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not (checkpoint.is_dir() and not marker.exists()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {epoch} of {run} was not started within {timeout_s:.0f} s")
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        if marker.exists():
            raise RuntimeError(f"checkpoint {epoch} was complete before the kill landed: the fault was not injected")
        return pid

    return inject


def actor_node(class_name: str, *, timeout_s: float = 300.0) -> str:
    """The id of the node a live actor of class ``class_name`` runs on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for row in ray._private.state.actors().values():
            if row["ActorClassName"] == class_name and row["State"] == "ALIVE":
                return row["Address"]["NodeID"]
        time.sleep(0.05)
    raise TimeoutError(f"no live {class_name} actor within {timeout_s:.0f} s")


def kill_after_checkpoint(title: str, epoch: int = 1, *, timeout_s: float = 600.0, pid: int | None = None) -> Callable[..., int]:
    """A fault that kills the process titled ``title`` (or the process ``pid``) once checkpoint ``epoch`` of the run is complete."""

    def inject(run: Path, bench: Bench | None = None) -> int:
        wait_for_checkpoint(run, epoch, timeout_s=timeout_s)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return pid
        return kill_process(title)

    return inject


def wait_for_checkpoint(run: Path | str, epoch: int, *, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not committed(RunDir(run), epoch):
        if time.monotonic() > deadline:
            raise TimeoutError(f"checkpoint {epoch} of {run} was not written within {timeout_s:.0f} s")
        time.sleep(0.02)


def committed(run: RunDir, epoch: int) -> bool:
    """Whether checkpoint ``epoch`` is complete and its commit is over: ``latest`` names it or a later one
    (the marker is written first, then ``latest``: a fault injected between the two would hit the commit)."""
    latest = run.checkpoints / LATEST
    return run.checkpoint(epoch).is_complete() and latest.exists() and latest.read_text().strip() >= checkpoint_name(epoch)


def kill_every_epoch(title: str) -> Callable[..., list[int]]:
    """A fault that kills the process titled ``title`` once in every epoch of the run: between checkpoint
    ``e - 1`` and checkpoint ``e``. In async mode the epoch samples ahead, so the last epoch may have
    nothing left to kill; the pids killed are returned."""

    def inject(run: Path, bench: Bench | None = None) -> list[int]:
        while not RunDir(run).config.exists():
            time.sleep(0.05)
        killed: list[int] = []
        for epoch in range(1, RunDir(run).read_config().train.epochs + 1):
            try:
                killed.append(kill_process(title, spare=set(killed), give_up=RunDir(run).checkpoint(epoch).is_complete))
            except TimeoutError:
                pass  # nothing titled so before the checkpoint: this epoch's samples were drawn ahead
            wait_for_checkpoint(run, epoch)
        if not killed:
            raise TimeoutError(f"no process titled {title!r} ran in any epoch")
        return killed

    return inject


class BenchCluster:
    """A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``, as Ray's own
    tests build one): each node its own raylet and resources, labelled ``rayalign-bench/node``
    (``head``, ``n1``, ...), so a fault can remove one as a cluster loses a machine."""

    LABEL = "rayalign-bench/node"

    def __init__(self, nodes: int, cpus_per_node: int):
        from ray.cluster_utils import Cluster  # lazy: the test-cluster helpers are needed only once the matrix runs

        self.cpus_per_node = cpus_per_node
        self.cluster = Cluster()
        self.nodes: dict[str, Any] = {}
        self.names = ["head", *(f"n{i}" for i in range(1, nodes))]
        for name in self.names:
            self.add(name)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(
            num_cpus=self.cpus_per_node,
            labels={self.LABEL: name},
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
        )
        self.cluster.wait_for_nodes()

    def remove_node_of(self, class_name: str) -> str:
        """Remove the node a live actor of ``class_name`` runs on (its raylet and every process on it
        killed); returns the node's name."""
        node_id = actor_node(class_name)
        names = {n["NodeID"]: n.get("Labels", {}).get(self.LABEL) for n in ray.nodes() if n["Alive"]}
        name = names.get(node_id)
        if name is None or name == "head":
            raise RuntimeError(f"the {class_name} actor runs on node {name or node_id}, which this fault must not remove")
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        return name

    def heal(self) -> None:
        """Start the nodes a fault removed again, for the next row."""
        for name in self.names:
            if name not in self.nodes:
                self.add(name)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@dataclasses.dataclass
class Bench:
    """What the rows share: the cluster, the storage server (if moto is installed), the workdir."""

    cluster: BenchCluster
    workdir: Path
    s3: Any = None
    judge_down_s: float = 30.0
    judge: Any = None
    """The judge of the row that has one (a :class:`~jobs.bench.judge.Judge`)."""


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    when: str
    """When it is injected, in words for the table."""
    inject: Callable[[Any, Bench], Any] | None = None
    """Run in a thread while the run trains in the given place (a path, or a URI for ``storage``
    rows); kills or breaks what the fault does; returns what it hit."""
    overrides: tuple[str, ...] = ()
    expect_error: str | None = None
    """A fault that must stop the run: a phrase of the error it must stop it with."""
    driver: bool = False
    """Kill the driver (a ``rayalign train`` process) once checkpoint 1 is complete, then run the same
    command with ``--resume``."""
    judge: bool = False
    """The row scores with the ``http`` reward, served by a judge process of its own (and has an
    undisturbed run of its own to compare with)."""
    storage: bool = False
    """The row's run is written to the S3 server (moto) this command starts."""


def kill_judge_for_a_while(run: Path, bench: Bench) -> int:
    """SIGKILL the judge once checkpoint 1 is complete and start it again ``bench.judge_down_s`` later."""
    wait_for_checkpoint(run, 1)
    pid = bench.judge.kill()
    time.sleep(bench.judge_down_s)
    bench.judge.start()
    return pid


def remove_rollout_node(run: Path, bench: Bench) -> str:
    """Remove the node of the rollout actor while it samples, once checkpoint 1 is complete."""
    wait_for_checkpoint(run, 1)
    find_process(SAMPLING)
    return bench.cluster.remove_node_of("RolloutWorker")


def deny_checkpoint_writes(run: str, bench: Bench) -> str:
    """Once checkpoint 1 is complete, the storage refuses writes under the run's checkpoints (AccessDenied)."""
    wait_for_checkpoint(run, 1)
    prefix = RunDir(run).checkpoints.uri.removeprefix(f"s3://{BUCKET}/") + "/"
    bench.s3.deny_writes(prefix)
    return prefix


def faults() -> list[Fault]:
    broken = f"{{components: [{{name: '{BROKEN_REWARD}'}}], on_invalid: %s}}"
    return [
        Fault("rollout actor killed mid-call", "first sampling call", inject=lambda run, bench: kill_process(SAMPLING)),
        # As many deaths as epochs, more than pools.max_restarts (3) allows in a row: none of them are in a row.
        Fault("rollout actor killed every epoch", "each epoch's sampling", inject=kill_every_epoch(SAMPLING)),
        Fault("reward actor killed", "after checkpoint 1", inject=kill_after_checkpoint("ray::RewardWorker")),
        Fault("reference actor killed", "after checkpoint 1", inject=kill_after_checkpoint("ray::ReferenceWorker")),
        Fault(
            "node of the rollout actor removed",
            "sampling after checkpoint 1",
            inject=remove_rollout_node,
            overrides=(f"pools.rollout.node_labels={{{BenchCluster.LABEL}: '!head'}}",),  # never on the driver's node
        ),
        Fault("learner killed", "after checkpoint 1", inject=kill_after_checkpoint(LEARNER)),
        Fault("learner killed while checkpointing", "writing checkpoint 2", inject=lambda run, bench: kill_while_checkpointing(2)(run)),
        Fault("driver killed, then --resume", "after checkpoint 1", driver=True),
        Fault("HTTP judge down, then back", "after checkpoint 1", inject=kill_judge_for_a_while, judge=True),
        Fault(
            "checkpoint storage refuses writes",
            "after checkpoint 1",
            inject=deny_checkpoint_writes,
            storage=True,
            expect_error="writing checkpoint epoch 2",
        ),
        Fault(
            "reward returns NaN (on_invalid: error)",
            "every epoch",
            overrides=(f"reward={broken % 'error'}",),
            expect_error="non-finite score",
        ),
        Fault("reward returns NaN (on_invalid: drop)", "every epoch", overrides=(f"reward={broken % 'drop'}",)),
    ]


def kill_driver_then_resume(cfg: Config, run: Path, *, address: str) -> int:
    """``rayalign train`` in its own process, SIGKILLed once checkpoint 1 is complete, then the same command
    with ``--resume`` to the end; returns the pid killed. ``ValueError`` if the resumed command fails."""
    config = run.with_name(run.name + ".yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(config_to_yaml(cfg))
    command = [sys.executable, "-m", "jobs.cli", "train", "--config", str(config), "--output-dir", str(run), "--no-progress"]
    command += ["--address", address]
    log = run.with_name(run.name + ".log")
    with open(log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            kill_after_checkpoint("", timeout_s=600.0, pid=driver.pid)(run)
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait()
        resumed = subprocess.run([*command, "--resume"], stdout=out, stderr=subprocess.STDOUT)
    if resumed.returncode != 0:
        raise ValueError(f"rayalign train --resume exited with {resumed.returncode}; see {log}")
    return driver.pid


def fault_config(cfg: Config, *, epochs: int) -> Config:
    """``cfg`` shortened to ``epochs`` with a checkpoint every epoch and a reference pool (one of the faults kills it)."""
    reference = cfg.pools.reference if cfg.pools.reference.num_actors else replace(cfg.pools.reference, num_actors=1)
    return replace(
        cfg,
        train=replace(cfg.train, epochs=epochs, checkpoint_every=1, eval_every=0),
        pools=replace(cfg.pools, reference=reference),
    )


def final_weights(run: Path) -> dict[str, np.ndarray]:
    latest = RunDir(run).latest_checkpoint()
    folder = latest.lora if latest.lora.exists() else latest.unet
    with folder.as_local_dir() as local:
        return {k: v for f in sorted(local.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def compare(run: Path, reference: Path, *, seconds: float, reference_seconds: float) -> dict[str, Any]:
    """How a faulted run differs from the undisturbed one."""
    hit, calm = read_metrics(run), read_metrics(reference)
    expected = calm[-1]["samples"] if calm else 0
    got = hit[-1]["samples"] if hit else 0
    epochs = [m["epoch"] for m in hit]
    duplicated_epochs = len(epochs) - len(set(epochs))
    per_epoch = calm[0]["samples"] if calm else 0
    same_prompts = [m["prompts/digest"] for m in hit] == [m["prompts/digest"] for m in calm]
    a, b = final_weights(reference), final_weights(run) if RunDir(run).latest_checkpoint() else {}
    equal = bool(b) and a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    return {
        "samples_lost": max(0, expected - got),
        "samples_duplicated": max(0, got - expected) + duplicated_epochs * per_epoch,
        "same_prompts_per_epoch": same_prompts,
        "same_rewards_per_epoch": [m["reward/mean"] for m in hit] == [m["reward/mean"] for m in calm],
        "weights_equal": equal,
        "recovery_s": max(0.0, seconds - reference_seconds),
        "actor_restarts": sum(m.get("faults/actor_restarts", 0) for m in hit),
        "learner_restarts": sum(m.get("faults/learner_restarts", 0) for m in hit),
        "dropped_samples": sum(m.get("faults/dropped_samples", 0) for m in hit),
    }


def run_fault(fault: Fault, cfg: Config, bench: Bench, reference: tuple[Path, float]) -> dict[str, Any]:
    """One row of the matrix."""
    slug = re.sub(r"[^a-z0-9]+", "-", fault.name.lower()).strip("-")
    row: dict[str, Any] = {"fault": fault.name, "when": fault.when}
    address = bench.cluster.address
    overrides = list(fault.overrides)
    if fault.storage:
        if bench.s3 is None:
            row.update(recovered=False, note="needs an S3 server: pip install 'moto[server]' (in rayalign's test extras)")
            return row
        run: Any = f"s3://{BUCKET}/{bench.workdir.name}/{slug}"
    else:
        run = bench.workdir / slug
    if fault.judge:
        bench.judge = Judge(free_port()).start()
        overrides.append(f"reward={{components: [{{name: http, options: {{url: '{bench.judge.url}'}}}}]}}")
    try:
        faulted = load_config(to_dict(cfg), overrides) if overrides else cfg
        if fault.judge:  # its own undisturbed run: the reward differs from the matrix's
            print(f"[{fault.name}] undisturbed, with the judge ...", flush=True)
            started = time.perf_counter()
            train(faulted, bench.workdir / f"{slug}-undisturbed", progress=False, address=address)
            reference = (bench.workdir / f"{slug}-undisturbed", time.perf_counter() - started)
        injected: dict[str, Any] = {}
        if fault.inject is not None:

            def inject():
                try:
                    injected["hit"] = fault.inject(run, bench)
                except Exception as error:  # reported in the row
                    injected["error"] = str(error)

            injector = threading.Thread(target=inject, daemon=True)
            injector.start()
        started = time.perf_counter()
        error = None
        try:
            if fault.driver:
                injected["hit"] = kill_driver_then_resume(faulted, run, address=address)
            else:
                train(faulted, run, progress=False, address=address)
        except ValueError as raised:
            error = str(raised)
        seconds = time.perf_counter() - started
        if fault.inject is not None:
            injector.join(timeout=bench.judge_down_s + 30)  # an injection that waits on the last checkpoint returns just after the run
    finally:
        if fault.judge:
            bench.judge.kill()
        if fault.storage:
            bench.s3.allow_writes()
        bench.cluster.heal()
    if error is not None and fault.expect_error is None:
        row.update(recovered=False, note=error[:200])
        return row
    if fault.inject is not None and "hit" not in injected:
        row.update(recovered=False, note=f"the fault was not injected: {injected.get('error', 'the run ended first')}")
        return row
    if fault.expect_error is not None:
        kept = RunDir(run).latest_checkpoint()
        row.update(
            recovered=error is not None and fault.expect_error in error and (not fault.storage or (kept and kept.name == "epoch_0001")),
            note=(error or "the run did not stop")[:200],
            checkpoint_kept=kept.name if kept else None,
        )
        return row
    row.update(compare(run, reference[0], seconds=seconds, reference_seconds=reference[1]))
    dropping = "on_invalid: drop" in fault.name
    row["recovered"] = (
        row["samples_lost"] == 0
        and row["samples_duplicated"] == 0
        and row["same_prompts_per_epoch"]
        and (dropping or (row["weights_equal"] and row["same_rewards_per_epoch"]))
        and (not dropping or row["dropped_samples"] > 0)
    )
    return row


def start_s3() -> Any:
    """A moto S3 server with the AWS variables pointing at it (before the cluster starts, so its nodes
    inherit them), or None when moto is not installed."""
    try:
        import moto.server  # noqa: F401  lazy: an optional test dependency; without it the storage row says how to install it
    except ImportError:
        return None
    server = S3Server().start()
    os.environ.update(server.env)
    return server


def bench_faults(
    cfg: Config,
    *,
    epochs: int,
    workdir: Path,
    only: Sequence[str] = (),
    nodes: int = 3,
    cpus_per_node: int = 4,
    judge_down_s: float = 30.0,
) -> dict[str, Any]:
    cfg = fault_config(cfg, epochs=epochs)
    chosen = [f for f in faults() if not only or any(word in f.name for word in only)]
    if not chosen:
        raise ValueError(f"--only {list(only)} matches no fault; faults: {', '.join(f.name for f in faults())}")
    if nodes < 3 and any("node" in f.name for f in chosen):
        raise ValueError(f"--nodes must be >= 3 for the node fault (the head and two nodes to move between), got {nodes}")
    s3 = start_s3() if any(f.storage for f in chosen) else None
    cluster = BenchCluster(nodes, cpus_per_node)
    bench = Bench(cluster=cluster, workdir=workdir, s3=s3, judge_down_s=judge_down_s)
    try:
        connect(cluster.address, None)
        print(f"[undisturbed] {epochs} epochs on {nodes} nodes of {cpus_per_node} CPUs ...", flush=True)
        started = time.perf_counter()
        train(cfg, workdir / "undisturbed", progress=False, address=cluster.address)
        reference = (workdir / "undisturbed", time.perf_counter() - started)
        rows = []
        for fault in chosen:
            print(f"[{fault.name}] ...", flush=True)
            rows.append(run_fault(fault, cfg, bench, reference))
    finally:
        ray.shutdown()
        cluster.shutdown()
        if s3 is not None:
            s3.stop()
    return {
        "epochs": epochs,
        "mode": cfg.train.mode,
        "nodes": nodes,
        "samples_per_epoch": cfg.train.samples_per_epoch,
        "undisturbed_s": reference[1],
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    def cell(row, key, fmt="{}"):
        return fmt.format(row[key]) if key in row and row[key] is not None else "-"

    header = ["fault", "injected", "recovered", "s lost", "samples lost", "duplicated", "weights equal", "note"]
    lines = [header]
    for row in report["rows"]:
        lines.append(
            [
                row["fault"],
                row["when"],
                "yes" if row["recovered"] else "NO",
                cell(row, "recovery_s", "{:.1f}"),
                cell(row, "samples_lost"),
                cell(row, "samples_duplicated"),
                {True: "yes", False: "no"}.get(row.get("weights_equal"), "-"),
                row.get("note", "")[:90] or (f"dropped {row['dropped_samples']:g}" if row.get("dropped_samples") else ""),
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    """``rayalign bench faults``."""
    cfg = config_of(args, what="run the fault matrix on")
    if args.epochs < 2:
        raise ValueError(f"--epochs must be >= 2 (the learner fault waits for checkpoint 1), got {args.epochs}")
    if args.asynchronous:
        cfg = replace(cfg, train=replace(cfg.train, mode="async"))
    output = json_output(args.output)
    workdir = workdir_of(args, prefix="rayalign-faults-")
    report = bench_faults(
        cfg,
        epochs=args.epochs,
        workdir=workdir,
        only=args.only,
        nodes=args.nodes,
        cpus_per_node=args.cpus_per_node,
        judge_down_s=args.judge_down_s,
    )
    print(format_table(report))
    write_report(output, {**report, "workdir": str(workdir)})
    return 0 if all(row["recovered"] for row in report["rows"]) else 1
