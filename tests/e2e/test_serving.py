"""The real application (Ray Serve, 2 expert groups, gRPC data plane) driven by real clients."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emoe.client import InferenceClient
from emoe.v1 import inference_pb2 as pb
from emoe.v1 import inference_pb2_grpc as pb_grpc
from tests.e2e.conftest import reference_tokens
from tests.require import require_module
from tests.waiting import wait_until

PROMPTS = ["Once upon a time", "The router holds the dense part", "Hello world!", "café 東京"]


@pytest.fixture(scope="module")
def reference(demo_model) -> list[list[int]]:
    return reference_tokens(demo_model, PROMPTS, 24, ignore_eos=False)


def test_streamed_greedy_equals_in_process_engine(app, reference):
    with InferenceClient(app.grpc) as client:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            parts = list(client.generate(prompt, max_tokens=24))
            tokens = [t for p in parts for t in p.token_ids]
            assert tokens == expected
            assert all(not p.finish_reason for p in parts[:-1]) and parts[-1].finish_reason in (
                "stop",
                "length",
            )
            whole = client.complete(prompt, max_tokens=24)
            assert list(whole.token_ids) == tokens
            assert whole.text == "".join(p.text for p in parts)
            assert whole.usage.completion_tokens == len(tokens)


def test_sixteen_concurrent_streams_and_late_joiners(app, demo_model):
    prompts = [f"stream {i} " + "word " * (i % 5) for i in range(16)]
    lengths = [8 + 3 * i for i in range(16)]
    want = reference_tokens(demo_model, prompts, lengths)
    results: dict[int, list[int]] = {}
    spans: dict[int, tuple[float, float]] = {}

    def run(i: int) -> None:
        with InferenceClient(app.grpc) as client:
            t0 = time.monotonic()
            first = None
            toks = []
            for msg in client.generate(prompts[i], max_tokens=lengths[i], ignore_eos=True):
                first = first or time.monotonic()
                toks.extend(msg.token_ids)
            results[i] = toks
            spans[i] = (first or t0, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for i, t in enumerate(threads):
        t.start()
        if i == 12:
            time.sleep(0.3)  # the last ones arrive while the batch is running
    for t in threads:
        t.join(timeout=300)
    assert [results[i] for i in range(16)] == want
    # a late request started producing tokens before the longest early one finished
    assert min(spans[i][0] for i in range(13, 16)) < max(spans[i][1] for i in range(13))


def test_cancelled_stream_frees_its_kv_blocks(app):
    def kv_blocks_used() -> int:
        return app.handle.router_stats.remote().result()["kv_blocks_used"]

    with InferenceClient(app.grpc) as client:
        stream = client.generate("Once upon a time", max_tokens=1000, ignore_eos=True)
        next(stream)
        assert kv_blocks_used() > 0
        stream.cancel() if hasattr(stream, "cancel") else stream.close()
    wait_until(kv_blocks_used, 20, "the cancelled stream's KV blocks to be freed", until=lambda n: n == 0)
    assert kv_blocks_used() == 0


BAD = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", prompt_token_ids=[1]), "prompt"),
    (dict(prompt_token_ids=[5, 999999]), "prompt_token_ids"),
    (dict(prompt_token_ids=[7] * 5000), "prompt"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=100000)), "max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)), "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=math.nan)), "top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_k=-3)), "top_k"),
]


@pytest.mark.parametrize("fields, name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_and_server_stays_healthy(channel, fields, name):
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in e.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = stub.Complete(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2)), timeout=60)
    assert len(ok.token_ids) >= 1


def test_oversized_message_is_refused(channel):
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="x" * (20 * 2**20)), timeout=30)
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)


def test_openai_client_completes_and_streams_chat(app):
    openai = require_module(
        "openai",
        "the official OpenAI client talks to the HTTP API",
        "the test extra: `pip install -e .[test]`",
    )
    client = openai.OpenAI(base_url=app.http + "/v1", api_key="unused")
    [model] = client.models.list().data
    done = client.completions.create(model=model.id, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True, temperature=0
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model.id, prompt="hi", max_tokens=8, temperature=-1)
