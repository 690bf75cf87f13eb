"""One Ray instance for the whole test session: a simulated 2-node cluster, 2 logical GPUs per node.

Imported by tests/conftest.py; started lazily by the first test that asks for `ray_cluster`.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

NODE_ARGS = dict(num_cpus=2, num_gpus=2, object_store_memory=150 * 2**20)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="emoe-tests")
    yield cluster
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve was never started
        pass
    ray.shutdown()
    cluster.shutdown()
