"""Joining a Ray cluster (or starting a local one), the same way for every rayalign command."""

from __future__ import annotations

import json
import os

import ray

NAMESPACE = "rayalign"
"""Ray namespace of rayalign's named actors (the shard hub)."""


def _env_vars_to_add(wanted: dict[str, str]) -> dict[str, str]:
    """``wanted`` minus the variables a submitted Ray Job's runtime_env already sets.

    Inside a Ray Job, ray.init refuses a runtime_env that sets a variable the job's own
    runtime_env sets too (even to the same value); the job's value wins.
    """
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:
        return wanted
    taken = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in wanted.items() if key not in taken}


def connect(address: str | None, num_cpus: int | None, *, dashboard: bool = False) -> None:
    """Join ``address`` (or $RAY_ADDRESS), or start a local cluster with ``num_cpus`` logical CPUs.

    A local cluster starts without Ray's dashboard unless ``dashboard``: nothing of rayalign uses
    it, and it costs seconds of every start.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Passive OpenMP waits: with more busy processes than cores (pools share a CPU
    # machine), spin-waiting torch threads were measured to slow every pool ~10x.
    wanted = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env = {"env_vars": _env_vars_to_add(wanted)}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
    else:
        # Logical CPUs can exceed physical ones: pools take fractions and mostly wait on each other.
        # address="local": always a new cluster. A bare ray.init() would attach to any cluster that
        # `ray start` left running on this machine (and then refuse num_cpus).
        ray.init(
            address="local",
            num_cpus=num_cpus or max(8, os.cpu_count() or 1),
            namespace=NAMESPACE,
            runtime_env=env,
            log_to_driver=True,
            include_dashboard=dashboard,
        )
