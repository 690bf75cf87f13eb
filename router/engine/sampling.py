"""The batched sampler: one call picks the next token of every sequence of a step from logits [B, V].

Logit processing runs in vLLM's order, each stage one tensor operation over the rows that use it (there is
no per-sequence Python loop over the vocabulary):

1. logprobs, when any row asks for them: the log-softmax of the raw logits (vLLM's default,
   `raw_logprobs`: what the model predicts, before any of the processing below);
2. `logit_bias` (added), `min_tokens` (stop tokens masked until that many tokens were generated), the
   structured-output grammar's token bitmask (router/engine/structured.py; tokens it forbids -> -inf);
3. penalties: repetition (tokens of the prompt or the output: logit / p where positive, * p where not),
   then frequency (minus f per occurrence in the output) and presence (minus p once per token in it);
4. greedy rows (temperature 0) take the argmax here; sampled rows: temperature, min_p, top_k, top_p;
5. a draw by exponential race, argmax(probs / q) with q ~ Exp(1) (a draw from probs).

The random numbers of output position i of a seeded sequence depend only on (seed, i), not on the batch
or on what was drawn before: a request resumed elsewhere from its prompt plus the tokens already sent
samples exactly what the uninterrupted request would have.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emoe.api import SamplingParams, TokenLogprob
from router.engine.structured import apply_bitmask

__all__ = ["SamplingParams", "SequenceSampling", "sample", "stop_token_set"]


def stop_token_set(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> frozenset[int]:
    """Token ids that end a sequence: the request's `stop_token_ids` plus the model's eos ids unless
    `ignore_eos`."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


@dataclass
class SequenceSampling:
    """What the sampler knows of one sequence. `output` is the sequence's own list of generated tokens
    (the caller appends the sampled token); `offset` counts tokens generated before this request (a
    resumed stream), so position = offset + len(output)."""

    params: SamplingParams
    stops: frozenset[int]
    prompt: Sequence[int] = ()
    output: list[int] = field(default_factory=list)
    offset: int = 0
    seed: int | None = None  # the draw's seed: params.seed, else none (an unseeded batch draw)
    grammar: Any = None  # a structured.Matcher where the request has params.structured
    _prompt_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.params.seed

    @property
    def position(self) -> int:
        return self.offset + len(self.output)

    def prompt_mask(self, vocab: int) -> torch.Tensor:
        """[V] bool: tokens of the prompt (cached; for the repetition penalty)."""
        if self._prompt_mask is None or self._prompt_mask.numel() != vocab:
            mask = torch.zeros(vocab, dtype=torch.bool)
            if self.prompt:
                mask[torch.tensor(list(self.prompt), dtype=torch.long)] = True
            self._prompt_mask = mask
        return self._prompt_mask


def unseeded() -> int:
    """A fresh random seed (for callers that want every draw of a sequence reproducible after the fact)."""
    return random.getrandbits(63)


def sample(
    logits: torch.Tensor, seqs: Sequence[SequenceSampling]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row of `logits` [B, V] (float32), and its logprob entry where asked."""
    x = logits.float()
    batch, vocab = x.shape
    params = [s.params for s in seqs]
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = torch.log_softmax(x[want_lp], dim=-1) if want_lp else None
    if x is logits and _modifies(seqs):
        x = x.clone()
    _bias_and_min_tokens(x, seqs)
    constrained = [r for r, s in enumerate(seqs) if s.grammar is not None]
    if constrained:
        apply_bitmask(x, constrained, [seqs[r].grammar for r in constrained], unmasked=logits)
    _penalties(x, seqs)

    tokens = torch.empty(batch, dtype=torch.long)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if greedy:
        tokens[greedy] = x[greedy].argmax(dim=-1) if len(greedy) < batch else x.argmax(dim=-1)
    if drawn:
        tokens[drawn] = _draw(x[drawn], [seqs[i] for i in drawn])
    ids = tokens.tolist()
    return ids, _logprobs(raw, want_lp, params, ids, batch)


def _modifies(seqs: Sequence[SequenceSampling]) -> bool:
    """Whether a stage writes into the logits in place (bias, min_tokens, grammar, penalties); the draw
    does not."""
    return any(
        s.params.logit_bias or s.params.min_tokens or s.params.has_penalties or s.grammar is not None
        for s in seqs
    )


def _bias_and_min_tokens(x: torch.Tensor, seqs: Sequence[SequenceSampling]) -> None:
    rows, cols, vals = [], [], []
    for r, s in enumerate(seqs):
        for tok, bias in s.params.logit_bias:
            rows.append(r)
            cols.append(tok)
            vals.append(bias)
    if rows:
        x.index_put_(
            (torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals, dtype=x.dtype), accumulate=True
        )
    rows, cols = [], []
    for r, s in enumerate(seqs):
        if s.position < s.params.min_tokens:
            rows.extend([r] * len(s.stops))
            cols.extend(s.stops)
    if rows:
        x[torch.tensor(rows), torch.tensor(cols)] = float("-inf")


def _penalties(x: torch.Tensor, seqs: Sequence[SequenceSampling]) -> None:
    rows = [r for r, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return
    vocab = x.shape[1]
    sel = [seqs[r] for r in rows]
    longest = max(1, max(len(s.output) for s in sel))
    out = torch.full((len(rows), longest), vocab, dtype=torch.long)  # padded with an extra column
    for j, s in enumerate(sel):
        if s.output:
            out[j, : len(s.output)] = torch.tensor(s.output, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, out, torch.ones(out.shape))[:, :vocab]
    in_output = counts > 0
    xs = x[rows]
    rep = torch.tensor([s.params.repetition_penalty for s in sel]).unsqueeze(1)
    if bool((rep != 1.0).any()):
        seen = in_output | torch.stack([s.prompt_mask(vocab) for s in sel])
        xs = torch.where(seen, torch.where(xs > 0, xs / rep, xs * rep), xs)
    freq = torch.tensor([s.params.frequency_penalty for s in sel]).unsqueeze(1)
    pres = torch.tensor([s.params.presence_penalty for s in sel]).unsqueeze(1)
    xs = xs - freq * counts - pres * in_output.float()
    x[rows] = xs


def _draw(x: torch.Tensor, seqs: list[SequenceSampling]) -> torch.Tensor:
    """One token per row of x [b, V], sampled with each row's temperature / min_p / top_k / top_p."""
    temp = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
    x = x / temp
    min_p = torch.tensor([s.params.min_p for s in seqs]).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    vocab = x.shape[1]
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        ordered, order = torch.sort(x, dim=-1, descending=True)
        rank = torch.arange(vocab).unsqueeze(0)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k]).unsqueeze(1)
        ordered = ordered.masked_fill(rank >= k, float("-inf"))
        p = torch.tensor(top_p).unsqueeze(1)
        if bool((p < 1.0).any()):
            sorted_probs = torch.softmax(ordered, dim=-1)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ahead
            ordered = ordered.masked_fill((before >= p) & (rank > 0), float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter_(1, order, ordered)
    probs = torch.softmax(x, dim=-1)
    q = torch.empty_like(probs)
    free = [j for j, s in enumerate(seqs) if s.seed is None]
    if free:
        q[free] = torch.empty(len(free), vocab).exponential_()
    for j, s in enumerate(seqs):
        if s.seed is not None:
            gen = torch.Generator().manual_seed((s.seed * 1_000_003 + s.position) % (1 << 63))
            q[j].exponential_(generator=gen)
    return (probs / q).argmax(dim=-1)


def _logprobs(
    raw: torch.Tensor | None, rows: list[int], params: list[SamplingParams], ids: list[int], batch: int
) -> list[TokenLogprob | None]:
    result: list[TokenLogprob | None] = [None] * batch
    if raw is None:
        return result
    chosen = torch.tensor([ids[r] for r in rows]).unsqueeze(1)
    chosen_lp = raw.gather(1, chosen)
    ranks = ((raw > chosen_lp).sum(dim=1) + 1).tolist()
    chosen_lp = chosen_lp.squeeze(1).tolist()
    k = max(params[r].logprobs for r in rows)
    top_lp, top_ids = raw.topk(k, dim=-1) if k else (None, None)
    top_lp = top_lp.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    for j, r in enumerate(rows):
        n = params[r].logprobs
        top = tuple(zip(top_ids[j][:n], top_lp[j][:n], strict=True)) if n else ()
        result[r] = TokenLogprob(ids[r], chosen_lp[j], ranks[j], top)
    return result


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], n: int) -> list[TokenLogprob]:
    """Logprob entries of `targets` (the prompt tokens following each position of `logits` [T, V])."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(list(targets), dtype=torch.long).unsqueeze(1)
    lp = raw.gather(1, tgt)
    ranks = ((raw > lp).sum(dim=1) + 1).tolist()
    lp = lp.squeeze(1).tolist()
    if n:
        top_lp, top_ids = raw.topk(n, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [
        TokenLogprob(t, lp[i], ranks[i], tuple(zip(top_ids[i], top_lp[i], strict=True)) if n else ())
        for i, t in enumerate(targets)
    ]
