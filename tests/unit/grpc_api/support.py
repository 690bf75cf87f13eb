"""Shared by the gRPC API tests: a fake backend (no Ray, no model), an event-loop thread, helpers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emoe.api import GenerateChunk, ModelInfo, Overloaded, UnknownRequest
from emoe.tokenizer import Tokenizer
from emoe.v1 import inference_pb2 as pb

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


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def self_signed_cert() -> tuple[bytes, bytes]:
    """(cert, key) PEM for 127.0.0.1 / localhost."""
    from cryptography import x509
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
