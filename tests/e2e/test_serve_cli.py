"""``rayalign serve`` as a user runs it: a real subprocess with its own Ray cluster, Ctrl-C to stop."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from actors.diffusion.generator import adapter_version
from tests.helpers.adapters import make_adapter
from tests.helpers.cli import rayalign


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_checkpoint(model_dir, run, epoch: int, *, seed: int) -> str:
    checkpoint = run / "checkpoints" / f"epoch_{epoch:04d}"
    adapter = make_adapter(model_dir, checkpoint / "lora", seed=seed)
    (checkpoint / "COMPLETE").write_text(f"{epoch}\n")
    (run / "checkpoints" / "latest").write_text(checkpoint.name + "\n")
    return adapter_version(adapter)


def health(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.loads(response.read())


class Output:
    """Everything the server prints, read as it comes (a full pipe would stall the server)."""

    def __init__(self, process):
        self.lines = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.thread.start()

    @property
    def text(self):
        return "".join(self.lines)


def wait_until(process, output, condition, what, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output.thread.join(10)
            pytest.fail(f"rayalign serve exited with {process.returncode} before {what}:\n{output.text}")
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"timed out waiting for {what}:\n{output.text}")


def test_serve_follows_a_training_run_on_two_replicas_and_stops_on_ctrl_c(tiny_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    first = write_checkpoint(tiny_pipeline_dir, run, 1, seed=1)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "serve",
            "--model",
            str(tiny_pipeline_dir),
            "--lora",
            str(run),
            "--port",
            str(port),
            "--watch",
            "1",
            "--replicas",
            "2",
            "--max-batch-size",
            "2",
            "--num-cpus",
            "4",
            "--set",
            "limits.max_steps=4",
            "--set",
            "limits.default_steps=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"),
    )
    output = Output(process)
    try:
        wait_until(process, output, lambda: health(port)["adapter_version"] == first, f"serving {first}")
        # Two replicas (--replicas 2): polling /healthz reaches both, each says which adapter it serves.
        served = {}

        def every_replica_serves(version):
            answer = health(port)
            served[answer["replica"]] = answer["adapter_version"]
            return len(served) == 2 and set(served.values()) == {version}

        wait_until(process, output, lambda: every_replica_serves(first), "both replicas serving the first checkpoint", timeout_s=60)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/images/generations",
            method="POST",
            data=json.dumps({"prompt": "a red circle on the left", "num_inference_steps": 2}).encode(),
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["adapter_version"] == first
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert "<title>rayalign</title>" in response.read().decode()

        second = write_checkpoint(tiny_pipeline_dir, run, 2, seed=2)  # training writes a newer checkpoint
        wait_until(process, output, lambda: f"now serving {second}" in output.text, f"the swap to {second}")
        wait_until(process, output, lambda: every_replica_serves(second), "both replicas serving the new checkpoint", timeout_s=60)

        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # Seen once in a full CI run (not reproduced alone): show where the shutdown stood.
            pytest.fail(f"serve did not exit within 120 s of Ctrl-C; its output so far:\n{output.text[-4000:]}")
        output.thread.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = output.text
    assert process.returncode == 0, output
    assert f"serving at http://127.0.0.1:{port}" in output and "hot-swapping" in output
    assert "requests without sampling fields use 2 steps, eta 1, guidance 4.5" in output  # --set limits.default_steps=2
    assert output.rstrip().endswith("stopped")
    assert "Traceback" not in output
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "0.0.0.0"], "set --api-key (or $RAYALIGN_API_KEY), or pass --allow-unauthenticated"),
        (["--watch", "5"], "--watch needs --lora"),
        (["--lora", "no/such/run"], "is not a LoRA adapter, checkpoint or run directory"),
        (["--model", "no/such/model"], "is not a directory"),
        (["--set", "batching.max_batch_size=0"], "batching.max_batch_size must be >= 1, got 0"),
        (["--max-batch-size", "100"], "scaling.max_ongoing_requests must be >= batching.max_batch_size (100)"),
        (["--port", "0"], "--port must be in [1, 65535]"),
    ],
)
def test_serve_user_errors_are_one_clear_line(args, message, monkeypatch):
    monkeypatch.delenv("RAYALIGN_API_KEY", raising=False)
    result = rayalign("serve", "--port", free_port(), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_busy_port():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        result = rayalign("serve", "--port", busy.getsockname()[1])
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr and "choose another --port" in result.stderr
