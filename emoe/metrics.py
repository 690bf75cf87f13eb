"""Metric primitives (no Prometheus client needed): a cumulative histogram, samples, and the text format.

Processes keep `Histogram`s and counters in plain Python; the Frontend gathers them into `Sample`s and
renders the Prometheus exposition format for `/metrics` (and mirrors them into Ray's metrics export).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # per bucket, non-cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding the q-quantile (NaN when empty)."""
        if self.count == 0:
            return math.nan
        target, seen = q * self.count, 0
        for bound, c in zip((*self.buckets, math.inf), self.counts, strict=True):
            seen += c
            if seen >= target:
                return bound
        return math.inf

    def to_dict(self) -> dict:
        return {
            "buckets": list(self.buckets),
            "counts": list(self.counts),
            "sum": self.total,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Histogram:
        return cls(tuple(d["buckets"]), list(d["counts"]), float(d["sum"]), int(d["count"]))


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class Family:
    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float, **labels: object) -> Family:
        self.samples.append(Sample(self.name, float(value), tuple((k, str(v)) for k, v in labels.items())))
        return self

    def add_histogram(self, h: Histogram, **labels: object) -> Family:
        base = tuple((k, str(v)) for k, v in labels.items())
        cumulative = 0
        for bound, c in zip((*h.buckets, math.inf), h.counts, strict=True):
            cumulative += c
            le = "+Inf" if math.isinf(bound) else repr(bound)
            self.samples.append(Sample(f"{self.name}_bucket", cumulative, (*base, ("le", le))))
        self.samples.append(Sample(f"{self.name}_sum", h.total, base))
        self.samples.append(Sample(f"{self.name}_count", h.count, base))
        return self


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: list[Family]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for s in f.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            value = "NaN" if math.isnan(s.value) else ("+Inf" if s.value == math.inf else repr(s.value))
            lines.append(f"{s.name}{{{labels}}} {value}" if labels else f"{s.name} {value}")
    return "\n".join(lines) + "\n"
