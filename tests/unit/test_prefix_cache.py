"""Automatic prefix caching: the block manager's bookkeeping, and an engine serving from cached blocks giving
the logits of one that recomputes everything (fp32)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from emoe.api import GenerateRequest, SamplingParams
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig
from router.engine.scheduler import BlockManager, Scheduler, Sequence

# ---- block manager and scheduler (plain Python) ----------------------------------------------------


def run_prefill(s: Scheduler, seq: Sequence) -> list[tuple[int, int]]:
    """Adds `seq` and steps (the engine's bookkeeping: computed positions, a token where a chunk samples)
    until its prompt is computed; the (start, n) chunks it ran."""
    s.add(seq)
    spans = []
    while seq.num_computed < len(seq.prompt):
        spans += [(c.start, c.n) for c in step(s) if c.seq is seq]
    return spans


def step(s: Scheduler):
    chunks = s.schedule()
    for c in chunks:
        s.computed(c.seq, c.start + c.n)
        if c.samples:
            c.seq.output.append(3)
    return chunks


def test_a_repeated_prompt_starts_at_its_first_uncached_token():
    s = Scheduler(BlockManager(32, 4), max_batch_tokens=64)
    a = Sequence("a", list(range(10)), 4)
    assert run_prefill(s, a) == [(0, 10)]
    assert s.blocks.num_cached == 2  # the full blocks [0..3], [4..7]; [8, 9] is not full
    s.finish(a)
    b = Sequence("b", list(range(10)), 4)  # the same prompt: ends mid-block
    assert run_prefill(s, b) == [(8, 2)]
    c = Sequence("c", list(range(6)), 4)  # a prefix of the cached prompt
    assert run_prefill(s, c) == [(4, 2)]
    d = Sequence("d", list(range(8)), 4)  # exactly the cached blocks: the last token is still computed
    assert run_prefill(s, d) == [(4, 4)]
    e = Sequence("e", [0, 1, 2, 3, 99, 5, 6, 7, 8], 4)  # differs in the second block: only the first is hit
    assert run_prefill(s, e) == [(4, 5)]
    st = s.blocks.stats()
    assert st["prefix_cache_queries"] == 10 + 10 + 6 + 8 + 9
    assert st["prefix_cache_hits"] == 8 + 4 + 4 + 4
    assert c.block_table[0] == b.block_table[0] == d.block_table[0] == e.block_table[0]


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(8, 4)
    s = Scheduler(bm, max_batch_tokens=64)
    a = Sequence("a", list(range(9)), 4)
    run_prefill(s, a)  # 3 blocks, 2 named
    b = Sequence("b", list(range(9)), 4)
    run_prefill(s, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_used == 4  # 2 shared + 2 own partial blocks
    s.finish(a)
    assert bm.num_used == 3  # the shared blocks are still held by b
    s.finish(b)
    assert bm.num_used == 0 and bm.num_free == 8 and bm.num_cached == 2  # freed, still cached


def test_idle_cached_blocks_are_evicted_least_recently_released_first_tail_first():
    bm = BlockManager(6, 4)
    s = Scheduler(bm, max_batch_tokens=64)
    a = Sequence("a", [1] * 12 + [2], 4)  # 4 blocks, 3 named
    run_prefill(s, a)
    s.finish(a)
    b = Sequence("b", [5] * 8 + [6], 4)  # 3 blocks: the 2 never-used + a's partial one; 2 named
    run_prefill(s, b)
    s.finish(b)
    assert bm.num_cached == 5 and bm.evictions == 0
    c = Sequence("c", [9] * 7, 4)  # 2 blocks: the 1 free, then one eviction: a's tail block first
    run_prefill(s, c)
    assert bm.evictions == 1
    assert len(bm.match(Sequence("a2", [1] * 12 + [2], 4))) == 2  # a's head blocks survive
    assert len(bm.match(Sequence("b2", [5] * 8 + [6], 4))) == 2  # b, released later, is untouched
    s.finish(c)


def test_admission_counts_only_uncached_blocks():
    bm = BlockManager(5, 4)
    s = Scheduler(bm, max_batch_tokens=64)
    a = Sequence("a", list(range(16)) + [99], 4)  # 5 blocks: the whole pool
    run_prefill(s, a)
    s.finish(a)
    # 4 cached blocks of 16 positions + 1 new: admitted although a fresh 17-token prompt could only just fit
    b = Sequence("b", list(range(16)) + [77, 78, 79], 4)
    assert run_prefill(s, b) == [(16, 3)]
    # a different prompt needing 2 blocks waits: the pool is b's (4 shared + 1)
    c = Sequence("c", [7] * 5, 4)
    s.add(c)
    assert [ch.seq.request_id for ch in s.schedule()] == ["b"]  # b's decode; c waits
    s.finish(b)
    assert [ch.seq.request_id for ch in s.schedule()] == ["c"]


def test_preempted_sequence_recomputes_from_its_cached_prefix():
    bm = BlockManager(6, 4)
    s = Scheduler(bm, max_batch_tokens=64)
    a = Sequence("a", list(range(8)) + [50], 20)
    b = Sequence("b", list(range(8)) + [60], 20)  # shares a's 2 full blocks
    run_prefill(s, a)
    run_prefill(s, b)
    assert bm.num_used == 4
    for _ in range(100):  # decode until the pool runs out and the newest (b) is preempted
        step(s)
        if b.num_preemptions:
            break
    assert b.num_preemptions == 1 and bm.match(b)[:2] == a.block_table[:2]  # a still holds them
    s.finish(a)
    hits = bm.hits
    chunks = s.schedule()
    assert [ch.seq.request_id for ch in chunks] == ["b"]
    assert chunks[0].start >= 8 and bm.hits - hits == chunks[0].start  # recomputed after its cached prefix


def test_sequences_admitted_together_share_the_blocks_one_of_them_computes():
    """Three sequences of one prompt (the n choices of a request) added at once: the first computes the
    prompt, the others wait for its blocks to be named and then start at its first uncached token."""
    s = Scheduler(BlockManager(32, 4), max_batch_tokens=64)
    prompt = list(range(1, 11))  # 2 full blocks and 2 positions
    seqs = [Sequence(f"n{i}", prompt, 4) for i in range(3)]
    other = Sequence("x", [90, 91, 92, 93, 94], 4)  # shares nothing: not held back
    for q in [*seqs, other]:
        s.add(q)
    first = step(s)
    assert [(c.seq.request_id, c.start, c.n) for c in first] == [("n0", 0, 10), ("x", 0, 5)]
    second = step(s)
    assert [(c.seq.request_id, c.start, c.n) for c in second] == [
        ("n0", 10, 1),
        ("x", 5, 1),
        ("n1", 8, 2),
        ("n2", 8, 2),
    ]
    assert seqs[1].block_table[:2] == seqs[2].block_table[:2] == seqs[0].block_table[:2]
    assert s.blocks.stats()["prefix_cache_hits"] == 16


def test_a_waiting_sequence_stops_waiting_when_the_one_filling_its_blocks_is_preempted_or_finished():
    s = Scheduler(BlockManager(32, 4), max_batch_tokens=6)  # the 10-token prompt takes 2 steps
    a, b = Sequence("a", list(range(1, 11)), 4), Sequence("b", list(range(1, 11)), 4)
    s.add(a)
    s.add(b)
    assert [(c.seq.request_id, c.start, c.n) for c in step(s)] == [("a", 0, 6)]  # b waits for block 2
    s.preempt(a)  # a's block [4..7] is no longer in flight: b may compute it
    assert [(c.seq.request_id, c.start) for c in s.schedule()] == [("a", 4)]  # a first, from its hit
    s.finish(a)
    assert [(c.seq.request_id, c.start) for c in s.schedule()] == [("b", 4)]
    assert not s.blocks._filling or all(q is b for q in s.blocks._filling.values())


def test_prefix_caching_off_computes_everything():
    s = Scheduler(BlockManager(32, 4, prefix_caching=False), max_batch_tokens=64)
    run_prefill(s, a := Sequence("a", list(range(10)), 4))
    s.finish(a)
    assert run_prefill(s, Sequence("b", list(range(10)), 4)) == [(0, 10)]
    assert s.blocks.num_cached == 0 and s.blocks.stats()["prefix_cache_hits"] == 0


# ---- the engine: cached blocks give the logits of a full recompute ---------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("demo") / "m")
    engine = Engine.from_pretrained(path, num_groups=2)
    yield path, engine
    engine.close()


def make(demo, dispatcher=None, **cfg) -> AsyncEngine:
    path, engine = demo
    return AsyncEngine(
        engine.spec, engine.model, dispatcher or engine.dispatcher, EngineConfig(**cfg), Tokenizer(path)
    )


async def first_logprobs(ae: AsyncEngine, rid: str, prompt, max_tokens=6) -> tuple[list[int], list]:
    """Greedy tokens and the top-5 logprobs of every generated token."""
    req = GenerateRequest(
        rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    )
    toks, lps = [], []
    async for c in ae.generate(req):
        toks.extend(c.token_ids)
        lps.extend(c.logprobs or ())
    return toks, lps


def assert_same(got, want):
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1], strict=True):
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in g.top]), torch.tensor([lp for _, lp in w.top]), atol=2e-5, rtol=0
        )


LONG = [(7 * i + 3) % 500 + 1 for i in range(45)]  # 45 tokens: 11 full blocks of 4 and one mid-block


@pytest.mark.parametrize(
    "prompts",
    [
        [LONG, LONG],  # the same prompt again: ends mid-block
        [LONG, LONG[:30]],  # a prefix of the cached prompt
        [LONG, LONG[:20] + [9, 9, 9, 9, 9]],  # shares its first 5 blocks, then differs
    ],
    ids=["repeat", "prefix-of-cached", "diverges"],
)
def test_served_from_cached_blocks_equals_recompute(demo, prompts):
    async def run(**cfg):
        ae = make(demo, block_size=4, **cfg)
        out = [await first_logprobs(ae, f"r{i}", p) for i, p in enumerate(prompts)]
        stats = ae.stats()
        await ae.close()
        return out, stats

    cached, on = asyncio.run(run())
    fresh, off = asyncio.run(run(prefix_caching=False))
    assert on["prefix_cache_hits"] >= 16 and off["prefix_cache_hits"] == 0
    for got, want in zip(cached, fresh, strict=True):
        assert_same(got, want)


def test_concurrent_sharing_under_eviction_and_preemption_equals_reference(demo):
    """20 requests over 3 system prompts in a 40-block pool (160 positions): blocks are shared while
    running, evicted under pressure and sequences are preempted; greedy output equals the reference."""
    _, engine = demo
    systems = [[(s * 31 + i) % 400 + 2 for i in range(18)] for s in range(3)]
    prompts = [systems[i % 3] + [i + 5, i + 6] for i in range(20)]
    want = engine.generate(prompts, max_tokens=10, ignore_eos=True)

    async def run():
        ae = make(demo, block_size=4, kv_blocks=40, max_batch_tokens=48)
        reqs = [
            GenerateRequest(f"c{i}", tuple(p), SamplingParams(max_tokens=10, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]

        async def one(r):
            return [t for c in [c async for c in ae.generate(r)] for t in c.token_ids]

        got = await asyncio.gather(*(one(r) for r in reqs))
        stats = ae.stats()
        await ae.close()
        return got, stats

    got, stats = asyncio.run(run())
    assert got == want
    assert stats["prefix_cache_hits"] > 0 and stats["preemptions"] > 0, stats
    assert stats["kv_blocks_used"] == 0  # everything released; cached blocks are free to evict


def test_n_choices_of_one_prompt_share_its_blocks_and_equal_separate_runs(demo):
    """Three seeded samples of one prompt submitted together (what `n=3` sends): the prompt is computed
    once (the other two are served from its blocks) and each sample equals the same request run alone."""
    prompt = LONG

    def req(i):
        return GenerateRequest(
            f"n{i}", tuple(prompt), SamplingParams(max_tokens=6, temperature=1.0, seed=11 + i, logprobs=5)
        )

    async def collect(ae, i):
        return [c async for c in ae.generate(req(i))]

    async def together():
        ae = make(demo, block_size=4)
        got = await asyncio.gather(*(collect(ae, i) for i in range(3)))
        stats = ae.stats()
        await ae.close()
        return got, stats

    async def alone(i):
        ae = make(demo, block_size=4, prefix_caching=False)
        got = await collect(ae, i)
        await ae.close()
        return got

    got, stats = asyncio.run(together())
    assert stats["prefix_cache_hits"] == 2 * 44, stats  # 11 full blocks of 4, twice
    for i, chunks in enumerate(got):
        want = asyncio.run(alone(i))
        toks = ([t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs or ()])
        ref = ([t for c in want for t in c.token_ids], [lp for c in want for lp in c.logprobs or ()])
        assert_same(toks, ref)
    assert [c.cached_tokens for c in (got[0][0], got[1][0], got[2][0])] == [0, 44, 44]


def test_cached_blocks_stay_valid_across_a_placement_change(demo):
    """The KV depends on the experts' outputs, not on where they run: blocks cached while the experts were
    2 groups serve a request after the placement is 3 groups, with the logits of a recompute."""
    path, _ = demo
    with Engine.from_pretrained(path, num_groups=3) as three:

        async def run(cached: bool):
            ae = make(demo, block_size=4, prefix_caching=cached)
            await first_logprobs(ae, "before", LONG)
            ae.dispatcher = three.dispatcher  # the re-placement: a new placement version, other groups
            out = await first_logprobs(ae, "after", LONG + [11, 12])
            hits = ae.stats()["prefix_cache_hits"]
            await ae.close()
            return out, hits

        (got, hits), (want, _) = asyncio.run(run(True)), asyncio.run(run(False))
    assert hits == 44 and three.dispatcher.placement.num_groups == 3
    assert_same(got, want)


def test_prompt_logprobs_requests_compute_their_whole_prompt(demo):
    async def run():
        ae = make(demo, block_size=4)
        await first_logprobs(ae, "warm", LONG)
        req = GenerateRequest("p", tuple(LONG), SamplingParams(max_tokens=1, prompt_logprobs=1))
        chunks = [c async for c in ae.generate(req)]
        stats = ae.stats()
        await ae.close()
        return chunks, stats

    chunks, stats = asyncio.run(run())
    entries = [e for c in chunks for e in (c.prompt_logprobs or ())]
    assert len(entries) == len(LONG) and all(e is not None for e in entries[1:])
    assert stats["prefix_cache_hits"] == 0  # the warm-up's blocks were not used for it


FAMILY_PROMPT = [(7 * i + 3) % 120 + 1 for i in range(45)]  # within the fixtures' 128-token vocabulary


async def cached_then_fresh(spec, model, dispatcher) -> tuple[tuple, tuple, int]:
    """The same prompt twice through an engine with caching on (the second from cached blocks), and once
    through one with it off: (second cached run, uncached run, hits)."""
    out = {}
    for cached in (True, False):
        ae = AsyncEngine(spec, model, dispatcher, EngineConfig(block_size=4, prefix_caching=cached))
        await first_logprobs(ae, "a", FAMILY_PROMPT)
        out[cached] = await first_logprobs(ae, "b", FAMILY_PROMPT + [5, 6])
        out[f"hits-{cached}"] = ae.stats()["prefix_cache_hits"]
        await ae.close()
    return out[True], out[False], out["hits-True"]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"], ids=["mla-latent-cache", "sliding-window"])
def test_cached_blocks_with_mla_and_sliding_window_layers(tmp_path, family):
    """MLA caches the compressed latent (DeepSeek-V3), gpt-oss alternates 8-token sliding-window layers with
    full ones: both read cached blocks like any other, the window a mask over all cached positions."""
    from tests.hf_fixtures import make_hf_checkpoint

    path = make_hf_checkpoint(family, tmp_path / family, seed=5)
    with Engine.from_pretrained(path) as engine:
        got, want, hits = asyncio.run(cached_then_fresh(engine.spec, engine.model, engine.dispatcher))
    assert hits == 44
    assert_same(got, want)
