"""Integration tests share one real 3-node Ray cluster on this machine, built as Ray's own tests build one.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes, each its own raylet with
its own logical resources (a custom resource ``node_<name>`` and the label
``rayalign-test/node=<name>``, so a test can pin a pool to a node) and its own working
directory (a relative path means something different on each node). The S3 server of the
session is started first, so every node's workers inherit its credentials.
"""

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest

NODES = ("head", "a", "b")
CPUS_PER_NODE = 4


@dataclasses.dataclass
class TestCluster:
    cluster: object
    workdirs: dict[str, Path]
    """Each node's working directory, by node name."""
    nodes: dict[str, object] = dataclasses.field(default_factory=dict)
    """Each node's ``ray.cluster_utils`` handle, by node name."""

    def remove(self, name: str) -> None:
        """Lose node ``name`` as a cluster loses a machine: its raylet and every process on it are killed."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def add(self, name: str) -> None:
        """Start node ``name`` (again), with its resources, label and working directory."""
        with _cwd(self.workdirs[name]):  # the raylet, and the workers it starts, run in the node's own directory
            self.nodes[name] = self.cluster.add_node(
                num_cpus=CPUS_PER_NODE,
                resources={f"node_{name}": 100.0},
                labels={"rayalign-test/node": name},
                object_store_memory=200 * 1024 * 1024,
                include_dashboard=False,
            )
        self.cluster.wait_for_nodes()

    def node_ids(self) -> dict[str, str]:
        """Ray node id by node name."""
        import ray

        by_resource = {next(k for k in n["Resources"] if k.startswith("node_")): n["NodeID"] for n in ray.nodes() if n["Alive"]}
        return {name: by_resource[f"node_{name}"] for name in NODES if f"node_{name}" in by_resource}


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="session")
def ray_cluster(s3, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster import connect

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    cluster = Cluster()
    test_cluster = TestCluster(cluster=cluster, workdirs={name: tmp_path_factory.mktemp(f"node-{name}") for name in NODES})
    for name in NODES:
        test_cluster.add(name)
    connect(cluster.address, None)
    yield test_cluster
    ray.shutdown()
    cluster.shutdown()
