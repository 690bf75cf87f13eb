"""The gRPC API's reflection, Python client, bearer token, TLS, malformed protobuf bytes, secrets in logs."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from emoe.client import InferenceClient
from tests.unit.grpc_api.support import LIMIT, assert_healthy, self_signed_cert, wait_for


def test_reflection_lists_services(channel):
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"emoe.v1.Inference", "grpc.health.v1.Health"} <= set(services)


def test_python_client(channel, start, backend, tok):
    address = start()
    with InferenceClient(address, timeout_s=10) as client:
        parts = list(client.generate("Hello", max_tokens=5, temperature=0.0, seed=None))
        whole = client.complete("Hello", max_tokens=5, seed=3)
        assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
        assert "".join(p.text for p in parts) == whole.text and whole.finish_reason == "length"
        assert client.model_info().vocab_size == tok.vocab_size
        client.cancel("r-client")
        assert "r-client" in backend.cancelled
        for _ in client.generate(prompt_token_ids=[9], max_tokens=LIMIT, request_id="slow-2"):
            break  # closing the iterator early cancels the request
        assert wait_for(lambda: "slow-2" in backend.cancelled)
        with pytest.raises(TypeError, match="temprature"):
            client.complete("Hello", temprature=1.0)
        with pytest.raises(grpc.RpcError) as err:
            client.complete("Hello", top_p=2.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bearer_token(start):
    address = start(api_token="s3cret")
    for token in (None, "wrong"):
        with InferenceClient(address, token=token, timeout_s=10) as client:
            for call in (client.model_info, lambda: list(client.generate("Hi", max_tokens=2))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with InferenceClient(address, token="s3cret", timeout_s=10) as client:
        assert client.complete("Hi", max_tokens=2).usage.completion_tokens == 2
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(start):
    cert, key = self_signed_cert()
    address = start(tls_cert=cert, tls_key=key)
    with InferenceClient(address, tls_root_cert=cert, timeout_s=10) as client:
        assert client.complete("Hi", max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(ValueError, match="together"):
        start(tls_cert=cert)


@pytest.mark.parametrize("method", ["Generate", "Complete", "GetModelInfo", "Cancel"])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x12\x05\x01", b"\x1a\x03\x08"])
def test_malformed_protobuf_bytes_are_invalid_argument(channel, stub, method, raw):
    path = f"/emoe.v1.Inference/{method}"
    if method == "Generate":
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(call(raw, timeout=10))
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(raw, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert_healthy(channel, stub)


def test_tokens_never_reach_the_logs(start, caplog):
    secret = "tok-" + "7" * 24
    caplog.set_level(logging.DEBUG)
    address = start(api_token=secret)
    for token in (secret, secret + "x", None):
        with InferenceClient(address, token=token, timeout_s=10) as client:
            try:
                client.complete(prompt_token_ids=[5, 6], max_tokens=2)
            except grpc.RpcError:
                pass
    assert secret not in caplog.text
