"""AsyncEngine: continuous batching equals the reference engine; admission, preemption, cancel, stops."""

from __future__ import annotations

import asyncio

import pytest

from emoe.api import GenerateRequest, Overloaded, SamplingParams
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig

PROMPTS = [[5, 6, 7, 8], [100, 200], [9] * 30, [1], list(range(40, 61))]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("demo") / "m")
    engine = Engine.from_pretrained(path, num_groups=2)
    yield path, engine
    engine.close()


def make(demo, **cfg) -> AsyncEngine:
    path, engine = demo
    return AsyncEngine(engine.spec, engine.model, engine.dispatcher, EngineConfig(**cfg), Tokenizer(path))


async def collect(ae: AsyncEngine, rid: str, prompt, **sampling):
    chunks = []
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(**sampling))
    async for c in ae.generate(req):
        chunks.append(c)
    return chunks


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(max_batch_tokens=8),  # prompts are chunked, mixed with decodes
        dict(
            kv_blocks=12, block_size=4
        ),  # 48 positions for 5 sequences: admission waits, preemption recomputes
        dict(micro_batches=2),  # ping-pong: each step as two interleaved micro-batches
        dict(micro_batches=2, max_batch_tokens=8),
    ],
    ids=["roomy", "chunked-prefill", "tight-kv", "ping-pong", "ping-pong-chunked"],
)
def test_concurrent_greedy_equals_reference(demo, cfg):
    _, engine = demo
    want = engine.generate(PROMPTS, max_tokens=12, ignore_eos=True)

    async def run():
        ae = make(demo, **cfg)
        outs = await asyncio.gather(
            *(collect(ae, f"r{i}", p, max_tokens=12, ignore_eos=True) for i, p in enumerate(PROMPTS))
        )
        stats = ae.stats()
        await ae.close()
        return outs, stats

    outs, stats = asyncio.run(run())
    assert [tokens(o) for o in outs] == want
    for o in outs:
        assert [c.finish_reason for c in o][-1] == "length" and all(c.finish_reason is None for c in o[:-1])
        assert o[-1].completion_tokens == 12
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    if cfg.get("kv_blocks") == 12:
        assert stats["preemptions"] > 0


def test_late_request_joins_the_running_batch(demo):
    async def run():
        ae = make(demo)
        first = asyncio.create_task(collect(ae, "long", [3, 4, 5], max_tokens=60, ignore_eos=True))
        while ae.tokens_generated < 5:
            await asyncio.sleep(0.001)
        late = await collect(ae, "late", [7, 8], max_tokens=3, ignore_eos=True)
        assert not first.done()  # the late one finished while the first was still running
        await first
        await ae.close()
        return late

    assert len(tokens(asyncio.run(run()))) == 3


def test_cancel_frees_blocks_at_once(demo):
    async def run():
        ae = make(demo)
        gen = ae.generate(GenerateRequest("c", (1, 2, 3), SamplingParams(max_tokens=500, ignore_eos=True)))
        await gen.__anext__()
        assert ae.stats()["kv_blocks_used"] > 0
        await gen.aclose()  # the client went away
        used = ae.stats()["kv_blocks_used"]
        await ae.close()
        return used

    assert asyncio.run(run()) == 0


def test_stop_strings_and_text(demo):
    path, engine = demo
    tok = Tokenizer(path)
    full = engine.generate([[5, 6, 7, 8]], max_tokens=30, ignore_eos=True)[0]
    text = tok.decode(full)
    stop = text[10:13]

    async def run():
        ae = make(demo)
        chunks = await collect(ae, "s", [5, 6, 7, 8], max_tokens=30, ignore_eos=True, stop=(stop,))
        whole = await collect(ae, "w", [5, 6, 7, 8], max_tokens=30, ignore_eos=True)
        await ae.close()
        return chunks, whole

    chunks, whole = asyncio.run(run())
    assert "".join(c.text for c in whole) == text
    got = "".join(c.text for c in chunks)
    assert got == text[: text.find(stop)] and chunks[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(demo):
    async def run():
        ae = make(demo)
        a = await collect(ae, "a", [1, 2], max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
        b = await collect(ae, "b", [1, 2], max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
        c = await collect(ae, "c", [1, 2], max_tokens=10, temperature=1.0, seed=4, ignore_eos=True)
        await ae.close()
        return a, b, c

    a, b, c = asyncio.run(run())
    assert tokens(a) == tokens(b) != tokens(c)


def test_full_queue_is_refused(demo):
    async def run():
        ae = make(demo, max_queue=1, max_num_seqs=1)
        running = asyncio.create_task(collect(ae, "run", [1], max_tokens=200, ignore_eos=True))
        while ae.tokens_generated == 0:
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(collect(ae, "queued", [2], max_tokens=2, ignore_eos=True))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue full"):
            await collect(ae, "refused", [3], max_tokens=2)
        running.cancel()
        assert len(tokens(await queued)) == 2  # the queued one still completes
        await ae.close()
        return ae.stats()

    assert asyncio.run(run())["kv_blocks_used"] == 0


def test_resumed_request_reports_the_usage_of_the_original(demo):
    prompt, sampling = [5, 6, 7, 8], dict(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)

    async def run():
        ae = make(demo)
        whole = await collect(ae, "orig", prompt, **sampling)
        sent = tokens(whole)[:5]
        resumed = GenerateRequest(
            "orig~1",
            tuple(prompt + sent),
            SamplingParams(**{**sampling, "max_tokens": 7}),
            resume_offset=len(sent),
        )
        rest = [c async for c in ae.generate(resumed)]
        await ae.close()
        return whole, sent, rest

    whole, sent, rest = asyncio.run(run())
    assert sent + tokens(rest) == tokens(whole)  # seeded sampling continues where the first stream stopped
    last, resumed_last = whole[-1], rest[-1]
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt), 12)
    assert (resumed_last.prompt_tokens, resumed_last.completion_tokens) == (len(prompt), 12)
    assert [c.completion_tokens for c in rest] == list(range(6, 13))
