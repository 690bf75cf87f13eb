"""Sliding-window load meters (plain Python + torch counts): tokens/s, busy fraction, per-expert tokens."""

from __future__ import annotations

import time
from collections import deque

import torch


class RateMeter:
    """Tokens and busy seconds over the last `window_s` seconds."""

    def __init__(self, window_s: float = 5.0, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._events: deque[tuple[float, float, float]] = deque()  # (time, tokens, busy_s)
        self._start = clock()

    def record(self, tokens: float, busy_s: float = 0.0) -> None:
        self._events.append((self.clock(), tokens, busy_s))
        self._trim()

    def _trim(self) -> None:
        cutoff = self.clock() - self.window_s
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()

    def _span(self) -> float:
        return max(1e-6, min(self.window_s, self.clock() - self._start))

    def rate(self) -> float:
        self._trim()
        return sum(e[1] for e in self._events) / self._span()

    def busy_fraction(self) -> float:
        self._trim()
        return min(1.0, sum(e[2] for e in self._events) / self._span())


class ExpertLoad:
    """Tokens routed to each (MoE layer, expert) in time buckets; `rates()` gives tokens/s per expert."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        window_s: float = 10.0,
        bucket_s: float = 1.0,
        clock=time.monotonic,
    ):
        self.layers, self.num_experts = list(layers), num_experts
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.window_s, self.bucket_s, self.clock = window_s, bucket_s, clock
        self._buckets: deque[tuple[float, torch.Tensor]] = deque()
        self._start = clock()

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        now = self.clock()
        if not self._buckets or now - self._buckets[-1][0] >= self.bucket_s:
            self._buckets.append((now, torch.zeros(len(self.layers), self.num_experts)))
        counts = torch.bincount(topk_ids.reshape(-1).cpu(), minlength=self.num_experts).float()
        self._buckets[-1][1][self.row[layer]] += counts
        while self._buckets and self._buckets[0][0] < now - self.window_s:
            self._buckets.popleft()

    def rates(self) -> torch.Tensor:
        """[layers, experts] tokens/s over the window."""
        now = self.clock()
        total = torch.zeros(len(self.layers), self.num_experts)
        for t, c in self._buckets:
            if t >= now - self.window_s:
                total += c
        return total / max(1e-6, min(self.window_s, now - self._start))
