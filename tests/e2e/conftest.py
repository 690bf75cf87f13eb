"""The real application, deployed once per module on the session's Ray cluster, and its clients."""

from __future__ import annotations

import socket

import grpc
import pytest

from emoe.demo import write_demo_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("e2e") / "demo")


@pytest.fixture(scope="module")
def app(ray_cluster, demo_model):
    """Deploys `cluster.app:build_app` (2 expert groups, gRPC data plane); yields its addresses."""
    from ray import serve

    from cluster.app import APP_NAME, build_app

    serve.shutdown()  # HTTP options apply only to a new Serve instance
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    cfg = dict(model=str(demo_model), groups=2, transport="grpc", grpc_port=0, max_queue=64, kv_blocks=512)
    handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    grpc_port = handle.addresses.remote().result()["grpc_port"]
    yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}", "handle": handle}
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture
def channel(app):
    with grpc.insecure_channel(app["grpc"]) as ch:
        yield ch
