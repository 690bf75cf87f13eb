"""Scheduler and block manager: budgets, chunked prefill mixed with decodes, admission, preemption."""

from __future__ import annotations

from router.engine.scheduler import BlockManager, Scheduler, Sequence, Status


def seq(rid: str, n_prompt: int, max_tokens: int = 8) -> Sequence:
    base = 1000 * (1 + sum(map(ord, rid)))  # prompts of their own: no prefix shared between sequences
    return Sequence(rid, list(range(base, base + n_prompt)), max_tokens)


def step(s: Scheduler, sample_token: int = 7) -> list[tuple[str, int, bool]]:
    """One scheduler step, then what the engine does: mark computed, append a token where sampled."""
    chunks = s.schedule()
    for c in chunks:
        c.seq.num_computed = c.start + c.n
    out = [(c.seq.request_id, c.n, c.samples) for c in chunks]
    for c in chunks:
        if c.samples:
            c.seq.output.append(sample_token)
    return out


def test_prefill_is_chunked_and_mixed_with_decodes():
    s = Scheduler(BlockManager(64, 4), max_batch_tokens=10)
    s.add(seq("a", 3))
    assert step(s) == [("a", 3, True)]
    s.add(seq("b", 25))  # longer than the budget: chunked
    assert step(s) == [("a", 1, True), ("b", 9, False)]
    assert step(s) == [("a", 1, True), ("b", 9, False)]
    assert step(s) == [("a", 1, True), ("b", 7, True)]
    assert step(s) == [("a", 1, True), ("b", 1, True)]


def test_admission_waits_for_blocks_and_finish_frees_them():
    bm = BlockManager(4, 4)  # 16 positions in all
    s = Scheduler(bm, max_batch_tokens=64)
    a, b = seq("a", 10), seq("b", 10)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 10, True)]  # b does not fit: it waits
    assert b.status is Status.WAITING and bm.num_used == 3
    s.finish(a)
    assert bm.num_used == 0
    assert step(s) == [("b", 10, True)]


def test_decode_growth_preempts_the_newest_and_recomputes_it():
    bm = BlockManager(4, 4)
    s = Scheduler(bm, max_batch_tokens=64)
    a, b = seq("a", 8), seq("b", 8)
    s.add(a)
    s.add(b)
    step(s)  # both admitted: 2 + 2 blocks, all used
    assert bm.num_free == 0
    assert step(s) == [("a", 1, True)]  # a needs a 3rd block: b (newer) is preempted
    assert b.status is Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b
    s.finish(a)
    assert step(s) == [("b", 9, True)]  # recomputed from prompt + its one output token
    assert b.output == [7, 7]


def test_max_num_seqs_caps_the_batch():
    s = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_num_seqs=2)
    for r in "abc":
        s.add(seq(r, 2))
    assert [r for r, _, _ in step(s)] == ["a", "b"]


def test_finish_of_waiting_sequence():
    s = Scheduler(BlockManager(2, 4))
    a = seq("a", 3)
    s.add(a)
    s.finish(a)
    assert not s.has_work() and a.status is Status.FINISHED
