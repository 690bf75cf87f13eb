"""The Frontend's public gRPC API against a fake backend (no Ray, no model): streaming, defaults,
model info, validation, status codes, cancellation."""

from __future__ import annotations

import math

import grpc
import pytest

from cluster.grpc_server import MAX_MESSAGE_BYTES
from emoe.v1 import inference_pb2 as pb
from tests.unit.grpc_api.support import LIMIT, MAX_CONTEXT, assert_healthy, request, rpc_error, wait_for


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


def test_client_cancellation_cancels_backend(channel, stub, backend):
    call = stub.Generate(request(max_tokens=LIMIT, request_id="slow-1"))
    assert next(call).token_ids and next(call).token_ids
    call.cancel()
    assert wait_for(lambda: "slow-1" in backend.cancelled)
    assert_healthy(channel, stub)
