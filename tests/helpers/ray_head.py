"""A real Ray head started with ``ray start --head`` on 127.0.0.1, stopped by its own pids.

Other Ray clusters may run on the same machine (other tests, other users), so it never
calls ``ray stop`` (which stops every Ray process of the user): it gets a temp dir of its
own, and at the end it terminates exactly the processes whose command line names that
directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


class RayHead:
    """``with RayHead(num_cpus=8) as head:`` -> ``head.dashboard_url``, ``head.token``, ``head.env``."""

    def __init__(self, *, num_cpus: int = 8):
        self.num_cpus = num_cpus
        self.token = secrets.token_hex(16)
        # Ray's unix socket paths must stay short (about 100 bytes), so not under pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ra-head-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # Token auth on, with a token of its own: the user's ~/.ray/auth_token is never read or written.
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            PATH=f"{bin_dir}:{os.environ.get('PATH', '')}",
            HF_HUB_OFFLINE="1",
            RAY_USAGE_STATS_ENABLED="0",
            # On a busy 2-core machine the dashboard agent can take over 30 s to start,
            # longer than the raylet waits for it by default.
            RAY_agent_register_timeout_ms="180000",
        )
        self.env.pop("RAY_ADDRESS", None)

    def __enter__(self) -> "RayHead":
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--num-cpus",
            str(self.num_cpus),
            "--temp-dir",
            str(self.temp_dir),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ]
        # Ray's fixed default ports (e.g. 52365 for the dashboard agent) clash with any other
        # cluster on the machine; a clash leaves the Jobs API without an agent.
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
        ):
            command += [flag, str(free_port())]
        # On an overloaded machine the raylet can give up waiting for its agents at start-up
        # (it then exits, and `ray start` fails): start again, from scratch, a few times.
        for attempt in range(1, 4):  # noqa: B007 - the count is reported when every attempt failed
            result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                return self
            self.stop(remove=False)
        self.stop()
        raise RuntimeError(f"ray start failed {attempt} times; last ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def own_pids(self) -> list[int]:
        marker = str(self.temp_dir).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def stop(self, timeout_s: float = 20.0, *, remove: bool = True) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.own_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout_s
            while self.own_pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.own_pids():
                break
        if remove:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
