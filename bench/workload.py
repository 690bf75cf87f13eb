"""The benchmark's workload (seeded random requests), what one request saw, and the statistics over them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

Work = list[tuple[list[int], int, float]]  # [(prompt ids, output length, arrival offset in s)]


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    prompt_len: tuple[int, int] = (16, 512)
    output_len: tuple[int, int] = (32, 256)
    concurrency: int = 32
    rate: float | None = None  # requests/s (Poisson); None = closed loop of `concurrency` clients
    seed: int = 0

    def make(self, vocab: int) -> Work:
        """[(prompt ids, output length, arrival offset in s)]; offsets are 0 in the closed loop."""
        rng = random.Random(self.seed)
        out, t = [], 0.0
        for _ in range(self.requests):
            n = rng.randint(*self.prompt_len)
            prompt = [rng.randrange(1, vocab) for _ in range(n)]
            out.append((prompt, rng.randint(*self.output_len), t))
            if self.rate:
                t += rng.expovariate(self.rate)
        return out


@dataclass
class RequestResult:
    tokens: list[int]
    arrival: float
    token_times: list[float]  # absolute, one per output token

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    ttft = [r.ttft for r in results]
    tpot = [t for r in results if (t := r.tpot) is not None]
    out_tokens = sum(len(r.tokens) for r in results)
    return {
        "requests": len(results),
        "output_tokens": out_tokens,
        "wall_s": wall_s,
        "tokens_per_s": out_tokens / wall_s,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "tpot_p50_s": percentile(tpot, 0.5),
        "tpot_p99_s": percentile(tpot, 0.99),
    }


def match_fraction(a: list[RequestResult], b: list[RequestResult]) -> float:
    """The fraction of requests whose tokens are the same in both runs."""
    return sum(x.tokens == y.tokens for x, y in zip(a, b, strict=True)) / len(a)
