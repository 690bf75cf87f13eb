"""The Frontend's public gRPC API against a fake backend (no Ray, no model): streaming, validation,
status codes, health, reflection, cancellation, auth, TLS and the Python client."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import math
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.grpc_api import InferenceServicer
from cluster.grpc_server import MAX_MESSAGE_BYTES, start_grpc_server
from emoe.api import GenerateChunk, ModelInfo, Overloaded, UnknownRequest
from emoe.client import InferenceClient
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from emoe.v1 import inference_pb2 as pb
from emoe.v1 import inference_pb2_grpc as pb_grpc

MAX_CONTEXT, LIMIT = 64, 32


class FakeBackend:
    """Echoes tokens prompt[-1]+1, +2, ... (mod vocab) up to max_tokens, finishing with "length"; every
    chunk carries the usage so far, as the engine's do.

    request_id prefixes pick a behaviour: "slow" sleeps between chunks, "overload" raises Overloaded,
    "boom" raises an unexpected error, "cut" sends an empty chunk and one token, then ends without a
    finish_reason (as after Cancel); cancel() records ids and raises UnknownRequest for "unknown*".
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.cancelled = tokenizer, []

    def info(self) -> ModelInfo:
        return ModelInfo("fake", "minimax_m2", self.tok.vocab_size, MAX_CONTEXT, LIMIT, (0,), 2, "grpc")

    async def generate(self, req):
        if req.request_id.startswith("overload"):
            raise Overloaded("queue full, retry later")
        if req.request_id.startswith("boom"):
            raise RuntimeError("secret detail")
        prompt_len = len(req.prompt_token_ids)
        if req.request_id.startswith("cut"):
            yield GenerateChunk(req.request_id, prompt_tokens=prompt_len)
            yield GenerateChunk(req.request_id, [7], "x", None, prompt_len, 1)
            return
        detok, n = self.tok.detokenizer(req.prompt_token_ids), req.sampling.max_tokens
        for i in range(n):
            if req.request_id.startswith("slow"):
                await asyncio.sleep(0.05)
            tid = (req.prompt_token_ids[-1] + 1 + i) % self.tok.vocab_size
            text = detok.add([tid]) + (detok.flush() if i == n - 1 else "")
            yield GenerateChunk(
                req.request_id, [tid], text, "length" if i == n - 1 else None, prompt_len, i + 1
            )

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        if request_id.startswith("unknown"):
            raise UnknownRequest(f"request_id: no running request {request_id!r}")


class LoopThread:
    """An asyncio loop on a daemon thread: the servers live there, the tests call them synchronously."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


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


def request(ids=(5, 6), max_tokens=6, request_id="", **sampling) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=max_tokens, **sampling)
    return pb.GenerateRequest(prompt_token_ids=list(ids), sampling=params, request_id=request_id)


def assert_healthy(channel, stub) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "emoe.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Complete(request(max_tokens=2), timeout=5).finish_reason == "length"


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, timeout=10)
        if not isinstance(result, pb.GenerateResponse):
            list(result)
    return info.value


def test_stream_and_complete(stub, tok):
    parts = list(stub.Generate(request(ids=tok.encode("Hello world"), max_tokens=7, request_id="r1")))
    assert len(parts) >= 3
    assert [p.finish_reason for p in parts[:-1]] == [""] * (len(parts) - 1)
    assert parts[-1].finish_reason == "length"
    assert all(not p.HasField("usage") for p in parts[:-1])
    assert parts[-1].usage.prompt_tokens == len(tok.encode("Hello world"))
    assert parts[-1].usage.completion_tokens == 7
    assert {p.request_id for p in parts} == {"r1"}
    ids = [t for p in parts for t in p.token_ids]
    text = "".join(p.text for p in parts)
    assert len(ids) == 7 and text == tok.decode(ids)
    whole = stub.Complete(request(ids=tok.encode("Hello world"), max_tokens=7, request_id="r2"))
    assert list(whole.token_ids) == ids and whole.text == text and whole.request_id == "r2"
    assert (whole.finish_reason, whole.usage) == ("length", parts[-1].usage)


def test_text_prompt_defaults_and_request_id(stub, tok):
    whole = stub.Complete(pb.GenerateRequest(prompt="Hello"))
    assert whole.token_ids[0] == tok.encode("Hello")[-1] + 1
    assert len(whole.token_ids) == 16 and whole.usage.completion_tokens == 16
    assert len(whole.request_id) == 32 and int(whole.request_id, 16) >= 0
    long = stub.Complete(pb.GenerateRequest(prompt_token_ids=[7] * (MAX_CONTEXT - 3)))
    assert len(long.token_ids) == 3  # the default max_tokens fits the context left


def test_stream_ended_by_backend_finishes_with_abort(stub):
    parts = list(stub.Generate(request(ids=[5, 6, 7], request_id="cut-1")))
    assert [(list(p.token_ids), p.text, p.finish_reason) for p in parts] == [
        ([7], "x", ""),
        ([], "", "abort"),
    ]
    assert (parts[-1].usage.prompt_tokens, parts[-1].usage.completion_tokens) == (3, 1)


def test_model_info(stub, tok):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.family, info.vocab_size) == ("fake", "minimax_m2", tok.vocab_size)
    assert (info.max_context, info.max_tokens_limit, list(info.eos_token_ids)) == (MAX_CONTEXT, LIMIT, [0])
    assert (info.num_groups, info.transport) == (2, "grpc")


BAD = {
    "empty prompt": (pb.GenerateRequest(), "prompt"),
    "prompt and ids": (pb.GenerateRequest(prompt="hi", prompt_token_ids=[5]), "prompt"),
    "id above vocab": (request(ids=[5, 10**6]), "prompt_token_ids"),
    "negative id": (request(ids=[-1]), "prompt_token_ids"),
    "prompt too long": (request(ids=[5] * MAX_CONTEXT), "prompt"),
    "max_tokens over limit": (request(max_tokens=LIMIT + 1), "sampling.max_tokens"),
    "over the context": (request(ids=[5] * (MAX_CONTEXT - 4), max_tokens=8), "sampling.max_tokens"),
    "temperature negative": (request(temperature=-0.5), "sampling.temperature"),
    "temperature nan": (request(temperature=math.nan), "sampling.temperature"),
    "temperature inf": (request(temperature=math.inf), "sampling.temperature"),
    "top_p above 1": (request(top_p=1.5), "sampling.top_p"),
    "top_p nan": (request(top_p=math.nan), "sampling.top_p"),
    "top_p negative": (request(top_p=-0.1), "sampling.top_p"),
    "top_k negative": (request(top_k=-1), "sampling.top_k"),
    "empty stop string": (request(stop=[""]), "sampling.stop"),
    "stop id above vocab": (request(stop_token_ids=[10**6]), "sampling.stop_token_ids"),
    "request_id too long": (request(request_id="x" * 300), "request_id"),
}


@pytest.mark.parametrize("rpc", ["Generate", "Complete"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument(channel, stub, rpc, case):
    req, field = BAD[case]
    err = rpc_error(getattr(stub, rpc), req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}:"), err.details()
    assert_healthy(channel, stub)


def test_oversized_message(channel, stub):
    err = rpc_error(stub.Complete, pb.GenerateRequest(prompt="a" * (MAX_MESSAGE_BYTES + 1024)))
    assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), err
    assert_healthy(channel, stub)


@pytest.mark.parametrize("rpc", ["Generate", "Complete"])
def test_backend_errors(channel, stub, rpc):
    err = rpc_error(getattr(stub, rpc), request(request_id="overload-1"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details()
    err = rpc_error(getattr(stub, rpc), request(request_id="boom-1"))
    assert err.code() == grpc.StatusCode.INTERNAL and "secret" not in err.details()
    assert "boom-1" in err.details()
    assert_healthy(channel, stub)


def test_cancel_rpc(channel, stub, backend):
    stub.Cancel(pb.CancelRequest(request_id="r-77"))
    assert "r-77" in backend.cancelled
    err = rpc_error(stub.Cancel, pb.CancelRequest(request_id="unknown-1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("request_id:")
    err = rpc_error(stub.Cancel, pb.CancelRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request_id:")
    assert_healthy(channel, stub)


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_client_cancellation_cancels_backend(channel, stub, backend):
    call = stub.Generate(request(max_tokens=LIMIT, request_id="slow-1"))
    assert next(call).token_ids and next(call).token_ids
    call.cancel()
    assert wait_for(lambda: "slow-1" in backend.cancelled)
    assert_healthy(channel, stub)


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


def self_signed_cert() -> tuple[bytes, bytes]:
    """(cert, key) PEM for 127.0.0.1 / localhost."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


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
