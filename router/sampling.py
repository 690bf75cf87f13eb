"""Sampling: greedy, temperature, top-k, top-p, with a per-request generator for reproducible seeds."""

from __future__ import annotations

import torch

from emoe.api import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Picks the next token of one sequence from its float32 logits [V]."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
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
