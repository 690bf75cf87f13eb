"""Logprobs over gRPC from the real engine: SamplingParams.logprobs / prompt_logprobs, in Generate's
messages and in Complete, equal the model's raw log-softmax (float32 on the wire)."""

from __future__ import annotations

import pytest
import torch

from cluster.grpc_api import InferenceServicer
from cluster.grpc_server import start_grpc_server
from emoe.client import InferenceClient
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def served(tmp_path_factory, loop):
    path = write_demo_model(tmp_path_factory.mktemp("glp") / "m")
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        server, port = loop.run(start_grpc_server(InferenceServicer(EngineBackend(engine, tok), tok)))
        yield f"127.0.0.1:{port}", engine
        loop.run(server.stop(0))


def test_logprobs_in_complete_and_generate(served):
    address, engine = served
    with InferenceClient(address) as client:
        whole = client.complete(prompt_token_ids=PROMPT, max_tokens=4, logprobs=2, prompt_logprobs=1)
        messages = list(client.generate(prompt_token_ids=PROMPT, max_tokens=4, logprobs=2, prompt_logprobs=1))
        plain = client.complete(prompt_token_ids=PROMPT, max_tokens=4)
    assert list(plain.token_ids) == list(whole.token_ids) and not plain.logprobs and not plain.prompt_logprobs
    out = list(whole.token_ids)
    raw = torch.log_softmax(engine.logits([PROMPT + out])[0].float(), dim=-1)
    assert [e.token_id for e in whole.logprobs] == out
    for i, e in enumerate(whole.logprobs):
        assert e.logprob == pytest.approx(float(raw[len(PROMPT) - 1 + i, out[i]]), abs=1e-4)
        assert e.rank == 1 and len(e.top) == 2 and e.top[0].token_id == out[i]
    assert [e.token_id for e in whole.prompt_logprobs] == PROMPT[1:]
    want = [float(raw[p - 1, PROMPT[p]]) for p in range(1, len(PROMPT))]
    assert [e.logprob for e in whole.prompt_logprobs] == pytest.approx(want, abs=1e-4)
    assert len(messages[0].prompt_logprobs) == len(PROMPT) - 1
    assert all(not m.prompt_logprobs for m in messages[1:])
    streamed = [e for m in messages for e in m.logprobs]
    assert [(e.token_id, e.logprob) for e in streamed] == [(e.token_id, e.logprob) for e in whole.logprobs]


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(served):
    address, _ = served
    prompt = [(11 * i) % 300 + 20 for i in range(70)]  # 4 full blocks of 16 and 6 tokens
    with InferenceClient(address) as client:
        first = client.complete(prompt_token_ids=prompt, max_tokens=2)
        again = client.complete(prompt_token_ids=prompt, max_tokens=2)
        streamed = list(client.generate(prompt_token_ids=prompt, max_tokens=2))
    assert (first.usage.prompt_tokens, first.usage.cached_tokens) == (70, 0)
    assert (again.usage.prompt_tokens, again.usage.cached_tokens) == (70, 64)
    assert streamed[-1].usage.cached_tokens == 64 and list(again.token_ids) == list(first.token_ids)
