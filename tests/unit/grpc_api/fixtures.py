"""Fixtures (re-exported by this package's conftest): the gRPC API server over a fake backend, shared by this package's modules."""

from __future__ import annotations

import grpc
import pytest

from cluster.grpc_api import InferenceServicer
from cluster.grpc_server import start_grpc_server
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from emoe.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.grpc_api.support import FakeBackend, LoopThread


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(write_demo_model(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def backend(tok):
    return FakeBackend(tok)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def start(loop, backend, tok):
    servers = []

    def start(**kwargs) -> str:
        server, port = loop.run(start_grpc_server(InferenceServicer(backend, tok), **kwargs))
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        loop.run(server.stop(0))


@pytest.fixture(scope="module")
def channel(start):
    with grpc.insecure_channel(start()) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.InferenceStub(channel)
