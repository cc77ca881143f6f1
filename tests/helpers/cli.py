"""Run the ``rayalign`` command as a user does: a real subprocess, offline."""

import os
import subprocess
import sys


def rayalign(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
