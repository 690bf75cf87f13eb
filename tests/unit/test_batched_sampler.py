"""The batched sampler against a plainly written per-row reference: penalties, logit_bias, min_tokens, min_p,
top_k / top_p, logprobs (raw, with rank and top-N), and seeded draws independent of the batch."""

from __future__ import annotations

import random

import pytest
import torch

from emoe.api import SamplingParams
from router.engine.sampling import SequenceSampling, sample

V = 40


def reference_logits(logits: torch.Tensor, s: SequenceSampling) -> list[float]:
    """vLLM's processing order, one token at a time: bias, min_tokens, repetition, frequency, presence."""
    p, x = s.params, [float(v) for v in logits]
    for tok, bias in p.logit_bias:
        x[tok] += bias
    if s.position < p.min_tokens:
        for tok in s.stops:
            x[tok] = float("-inf")
    for tok in range(len(x)):
        if tok in s.output or tok in s.prompt:
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        count = s.output.count(tok)
        x[tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return x


def random_seq(rng: random.Random, **fixed) -> SequenceSampling:
    fields = dict(
        temperature=0.0,
        presence_penalty=rng.choice([0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.7, 1.5]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        min_tokens=rng.choice([0, 3]),
        logit_bias=tuple((rng.randrange(V), rng.uniform(-5, 5)) for _ in range(rng.randint(0, 3))),
        max_tokens=16,
    )
    fields.update(fixed)
    params = SamplingParams(**fields)
    stops = frozenset(rng.sample(range(V), 2))
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 6))]
    output = [rng.randrange(V) for _ in range(rng.randint(0, 8))]
    return SequenceSampling(params, stops, prompt, output)


def test_greedy_rows_take_the_argmax_of_the_processed_logits():
    rng = random.Random(0)
    for trial in range(30):
        seqs = [random_seq(rng) for _ in range(6)]
        logits = torch.randn(6, V, generator=torch.Generator().manual_seed(trial)) * 3
        got, lps = sample(logits, seqs)
        want = [max(range(V), key=reference_logits(logits[r], s).__getitem__) for r, s in enumerate(seqs)]
        assert got == want, (trial, [s.params for s in seqs])
        assert lps == [None] * 6  # nobody asked for logprobs


def test_min_tokens_masks_the_stop_tokens_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 7] = 10.0  # the stop token is by far the likeliest
    early = SequenceSampling(SamplingParams(min_tokens=3), frozenset({7}), [1], [2, 3])
    done = SequenceSampling(SamplingParams(min_tokens=3), frozenset({7}), [1], [2, 3, 4])
    got, _ = sample(logits, [early, done])
    assert got[0] != 7 and got[1] == 7


def allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens the reference keeps after temperature, min_p, top_k, top_p."""
    probs = torch.softmax(logits / p.temperature, dim=-1).tolist()
    order = sorted(range(V), key=lambda t: -probs[t])
    keep = [t for t in order if probs[t] >= p.min_p * probs[order[0]]]
    if p.top_k:
        keep = keep[: p.top_k]
    mass, out = 0.0, []
    for t in keep:
        if out and mass >= p.top_p:
            break
        out.append(t)
        mass += probs[t] / sum(probs[u] for u in keep)
    return set(out)


@pytest.mark.parametrize(
    "fields",
    [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.05), dict(top_k=5, top_p=0.8, min_p=0.1)],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_sampled_tokens_stay_in_the_kept_set(fields):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2
    p = SamplingParams(temperature=0.9, **fields)
    keep = allowed(logits, p)
    seen = set()
    for seed in range(300):
        got, _ = sample(logits.unsqueeze(0), [SequenceSampling(p, frozenset(), seed=seed)])
        seen.add(got[0])
    assert seen <= keep and len(seen) > 1 and len(keep) < V


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    seen = {sample(logits, [SequenceSampling(p, frozenset(), seed=s)])[0][0] for s in range(200)}
    assert seen == {0, 1}


def test_unseeded_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = SamplingParams(temperature=1.0)
    n = 4000
    logits = torch.log(probs).expand(n, 4)
    got, _ = sample(logits, [SequenceSampling(p, frozenset()) for _ in range(n)])
    freq = torch.bincount(torch.tensor(got), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_seeded_draws_do_not_depend_on_the_batch():
    rng = random.Random(1)
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(9))
    seqs = [random_seq(rng, temperature=1.0, seed=100 + i) for i in range(5)]
    together, _ = sample(logits, seqs)
    alone = [sample(logits[i : i + 1], [seqs[i]])[0][0] for i in range(5)]
    assert together == alone
    shuffled, _ = sample(logits.flip(0), seqs[::-1])
    assert shuffled[::-1] == together


def test_logprobs_are_the_raw_distribution_with_rank_and_top_n():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5)) * 2
    seqs = [
        SequenceSampling(SamplingParams(logprobs=3, temperature=1.0, seed=1), frozenset()),
        SequenceSampling(SamplingParams(), frozenset()),  # no logprobs asked
        SequenceSampling(SamplingParams(logprobs=0, logit_bias=((2, 30.0),)), frozenset()),
    ]
    got, lps = sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert lps[1] is None and got[2] == 2  # the bias moved the choice, not the logprob
    for r in (0, 2):
        lp = lps[r]
        assert lp.token_id == got[r]
        assert lp.logprob == pytest.approx(float(raw[r, got[r]]), abs=1e-6)
        assert lp.rank == 1 + int((raw[r] > raw[r, got[r]]).sum())
    top = torch.topk(raw[0], 3)
    assert [t for t, _ in lps[0].top] == top.indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert lps[2].top == ()
