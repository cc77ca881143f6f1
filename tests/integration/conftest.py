"""Integration tests share one real local Ray cluster (8 logical CPUs on a 2-core box)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from orchestrator.run import connect

    connect(None, 8)
    yield ray
    ray.shutdown()
