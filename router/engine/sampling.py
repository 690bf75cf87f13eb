"""Sampling: greedy, temperature, top-k, top-p, with a per-request generator for reproducible seeds."""

from __future__ import annotations

import torch

from emoe.api import SamplingParams

__all__ = ["Sampler", "SamplingParams", "stop_token_set"]


def stop_token_set(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> frozenset[int]:
    """Tokens that end a sequence (and are included in its output): the request's stop ids, plus the
    model's eos ids unless `ignore_eos`."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


class Sampler:
    """Picks the next token of one sequence from its float32 logits [V].

    The random draw for output position i depends only on (seed, i), not on what was drawn before: a
    request resumed elsewhere from its prompt plus the tokens already sent (`offset` of them) samples
    exactly what the uninterrupted request would have."""

    def __init__(self, params: SamplingParams, offset: int = 0):
        self.params, self.index = params, offset
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.seed = params.seed if params.seed is not None else torch.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        index, self.index = self.index, self.index + 1
        if self.generator is not None:
            self.generator.manual_seed((self.seed * 1_000_003 + index) % (1 << 63))
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p  # always keeps the first
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
