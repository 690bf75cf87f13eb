"""The serving engine applies the batched sampler's fields per request, in one batch: penalties, logit_bias,
min_tokens and logprobs, each request's own, equal to the offline engine's; logprobs are the raw model's."""

from __future__ import annotations

import asyncio

import pytest
import torch

from emoe.api import GenerateRequest, SamplingParams
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("demo") / "m")
    engine = Engine.from_pretrained(path, num_groups=2)
    yield path, engine
    engine.close()


async def run_all(demo, requests: dict[str, dict], prompts=None, **cfg) -> dict[str, list]:
    path, engine = demo
    ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, EngineConfig(**cfg), Tokenizer(path))

    async def one(rid, sampling):
        prompt = (prompts or {}).get(rid, PROMPT)
        req = GenerateRequest(rid, tuple(prompt), SamplingParams(**sampling))
        return [c async for c in ae.generate(req)]

    got = await asyncio.gather(*(one(rid, s) for rid, s in requests.items()))
    await ae.close()
    return dict(zip(requests, got, strict=True))


def test_each_request_gets_its_own_processing_in_one_batch(demo):
    _, engine = demo
    free = engine.generate([PROMPT], max_tokens=8, ignore_eos=True)[0]
    requests = {
        "plain": dict(max_tokens=8, ignore_eos=True),
        "biased": dict(max_tokens=8, ignore_eos=True, logit_bias=((77, 100.0),)),
        "penalized": dict(max_tokens=8, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=1.5),
        "min_tokens": dict(max_tokens=8, stop_token_ids=(free[0],), min_tokens=3),
        "stopped": dict(max_tokens=8, stop_token_ids=(free[0],)),
    }
    chunks = asyncio.run(run_all(demo, requests))
    toks = {rid: [t for c in cs for t in c.token_ids] for rid, cs in chunks.items()}
    assert toks["plain"] == free and toks["biased"] == [77] * 8
    penalized = engine.generate(
        [PROMPT], max_tokens=8, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=1.5
    )[0]
    assert toks["penalized"] == penalized != free
    assert toks["stopped"] == [free[0]]
    assert len(toks["min_tokens"]) >= 3 and free[0] not in toks["min_tokens"][:3]


def test_logprobs_stream_with_each_token(demo):
    _, engine = demo
    chunks = asyncio.run(run_all(demo, {"lp": dict(max_tokens=4, ignore_eos=True, logprobs=2)}))["lp"]
    out = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks if c.token_ids for e in c.logprobs]
    assert [e.token_id for e in entries] == out
    logits = engine.logits([PROMPT + out])[0]  # [T, V], position i predicts token i + 1
    raw = torch.log_softmax(logits.float(), dim=-1)
    for i, e in enumerate(entries):
        row = raw[len(PROMPT) - 1 + i]
        assert e.logprob == pytest.approx(float(row[out[i]]), abs=1e-4)
        assert e.rank == 1 and len(e.top) == 2 and e.top[0][0] == out[i]  # greedy: the top token


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(max_batch_tokens=8), dict(kv_blocks=10, block_size=4)],
    ids=["roomy", "chunked-prefill", "tight-kv"],
)
def test_prompt_logprobs_come_with_the_first_chunk(demo, cfg):
    _, engine = demo
    prompts = {f"p{i}": list(range(10 + i, 30 + 3 * i)) for i in range(3)}
    requests = {rid: dict(max_tokens=3, ignore_eos=True, prompt_logprobs=2) for rid in prompts}
    requests["none"] = dict(max_tokens=3, ignore_eos=True)
    got = asyncio.run(run_all(demo, requests, prompts, **cfg))
    assert all(c.prompt_logprobs is None for c in got["none"])
    for rid, prompt in prompts.items():
        first = next(c for c in got[rid] if c.token_ids)
        entries = first.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        assert all(c.prompt_logprobs is None for c in got[rid] if c is not first)
        raw = torch.log_softmax(engine.logits([prompt])[0].float(), dim=-1)
        for p in range(1, len(prompt)):
            e = entries[p]
            assert e.token_id == prompt[p]
            assert e.logprob == pytest.approx(float(raw[p - 1, prompt[p]]), abs=1e-4)
            assert e.rank == 1 + int((raw[p - 1] > raw[p - 1, prompt[p]]).sum()) and len(e.top) == 2
