"""The memory-bandwidth roofline (DESIGN §8): the bytes each decode step touches over the machine's measured
read bandwidth, against the step's measured time.

Per step: every dense tensor once, each routed-to expert once per layer (counted by `CountingDispatcher`),
the step's embedding rows and the KV it reads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from emoe.layout import expert_shapes, router_tensors
from emoe.placement import Placement
from emoe.spec import ModelSpec
from router.dispatch import Dispatcher


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10, device: str = "cpu") -> float:
    """Bytes/s of a sum over an fp32 tensor of `nbytes` (far beyond the caches): the best of `repeats`
    (as STREAM reports), so the floor is the fastest this machine was seen to read."""
    x = torch.ones(nbytes // 4, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x.sum()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Roofline:
    """Bytes a step touches: every dense tensor once, each routed-to expert once per layer, the KV read."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        size = torch.empty((), dtype=dtype).element_size()
        self.spec = spec
        dense = router_tensors(spec)
        dense.pop("model.embed_tokens.weight")  # only the step's rows are read
        self.dense_bytes = sum(_numel(s) for s in dense.values()) * size
        self.row_bytes = spec.hidden_size * size
        self.expert_bytes = sum(_numel(s) for s in expert_shapes(spec)) * size
        if spec.attention == "mla":
            per_pos = spec.kv_lora_rank + spec.qk_rope_head_dim
        else:
            per_pos = 2 * spec.num_kv_heads * spec.head_dim
        self.kv_bytes_per_pos = per_pos * size * spec.num_layers
        self.experts_touched = 0  # accumulated by the counting dispatcher during a step

    def step_bytes(self, tokens: int, context_positions: int) -> int:
        return (
            self.dense_bytes
            + tokens * self.row_bytes
            + self.experts_touched * self.expert_bytes
            + context_positions * self.kv_bytes_per_pos
        )


class CountingDispatcher:
    """A Dispatcher around another: counts the distinct experts each layer's tokens go to."""

    def __init__(self, inner: Dispatcher, roofline: Roofline):
        self.inner, self.roofline = inner, roofline

    @property
    def placement(self) -> Placement:
        return self.inner.placement

    async def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        self.roofline.experts_touched += int(torch.unique(topk_ids).numel())
        return await self.inner.forward(layer, hidden, topk_ids, topk_weights)

    def begin_step(self) -> None:
        self.inner.begin_step()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


@dataclass
class StepRecord:
    seconds: float
    decode_only: bool
    batch: int  # sequences in the step
    tokens: int
    bytes_touched: int


class StepLog:
    """An `AsyncEngine.on_step` callback: one StepRecord per step, with the bytes it touched when a
    roofline is counting (its expert count is reset for the next step)."""

    def __init__(self, roofline: Roofline | None):
        self.roofline = roofline
        self.steps: list[StepRecord] = []

    def __call__(self, seconds: float, chunks) -> None:
        tokens = sum(c.n for c in chunks)
        nbytes = 0
        if self.roofline is not None:
            nbytes = self.roofline.step_bytes(tokens, sum(c.start + c.n for c in chunks))
            self.roofline.experts_touched = 0
        self.steps.append(StepRecord(seconds, all(c.n == 1 for c in chunks), len(chunks), tokens, nbytes))

    def full_decode_ms_median(self, concurrency: int) -> float:
        """Median milliseconds of the decode-only steps that ran at least `concurrency` sequences."""
        full = [s.seconds for s in self.steps if s.decode_only and s.batch >= concurrency]
        return statistics.median(full) * 1e3 if full else float("nan")


def roofline_summary(steps: list[StepRecord], bw: float, concurrency: int, roof: Roofline) -> dict:
    decode = [s for s in steps if s.decode_only]
    full = [s for s in decode if s.batch >= concurrency] or decode
    floor = sum(s.bytes_touched for s in full) / bw
    took = sum(s.seconds for s in full)
    return {
        "bandwidth_gb_s": bw / 1e9,
        "decode_steps": len(full),
        "batch": statistics.median([s.batch for s in full]) if full else 0,
        "step_ms_median": statistics.median([s.seconds for s in full]) * 1e3 if full else float("nan"),
        "floor_ms_median": statistics.median([s.bytes_touched / bw for s in full]) * 1e3 if full else 0,
        "bytes_per_step_median": statistics.median([s.bytes_touched for s in full]) if full else 0,
        "fraction": floor / took if took else float("nan"),
        "dense_bytes": roof.dense_bytes,
        "expert_bytes": roof.expert_bytes,
    }
