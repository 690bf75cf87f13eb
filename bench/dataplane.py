"""Data-plane micro-benchmark: dispatch + combine round trip of one MoE layer, per transport.

    python -m bench.dataplane [--tokens 1,8,32,128,512] [--hidden 1024,4096] [--iters 200] [--json out.json]

For each hidden size it writes a one-layer synthetic MiniMax-M2 checkpoint (random weights, tiny expert
FFN so compute does not hide the transport), starts one expert group as a Ray actor, and times
`dispatcher.forward` for each transport next to the in-process dispatcher on the same weights. Reported:
p50 / p99 microseconds per call, and the transport overhead (p50 remote - p50 local), all in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import torch

from bench.backends import open_dispatcher
from emoe.demo import demo_config, random_weights, write_checkpoint
from emoe.spec import ModelSpec
from router.dispatch import Dispatcher

TRANSPORTS = ("local", "grpc", "dist")


def synthetic_checkpoint(path: Path, hidden: int) -> Path:
    cfg = demo_config(
        "demo",
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        rotary_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=16,
        vocab_size=256,
        torch_dtype="bfloat16",
    )
    write_checkpoint(path, random_weights(ModelSpec.from_config(cfg), 0, torch.bfloat16), cfg)
    return path


async def time_calls(dispatcher: Dispatcher, spec: ModelSpec, tokens: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of layer 0 on `tokens` random rows, after 10 warm-up calls."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden_size, generator=g).to(torch.bfloat16)  # [T, H]
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(tokens)])
    w = torch.rand(tokens, spec.top_k, generator=g)  # [T, k]
    out = []
    for i in range(iters + 10):
        t0 = time.perf_counter()
        await dispatcher.forward(0, x, ids, w)
        if i >= 10:  # warm-up: connections, allocator
            out.append(time.perf_counter() - t0)
    return out


async def measure(path: Path, hidden: int, token_counts: list[int], iters: int) -> list[dict]:
    """One row per token count: p50 / p99 / mean µs per call of every transport, and the remote overheads."""
    spec = ModelSpec.from_pretrained(path)
    rows = []
    async with AsyncExitStack() as stack:
        dispatchers = {
            t: await stack.enter_async_context(open_dispatcher(t, path, spec, torch.bfloat16, "cpu", 1, {}))
            for t in TRANSPORTS
        }
        for tokens in token_counts:
            row = {"hidden": hidden, "tokens": tokens}
            for name, dispatcher in dispatchers.items():
                ts = await time_calls(dispatcher, spec, tokens, iters)
                row[f"{name}_p50_us"], row[f"{name}_p99_us"] = pct(ts, 0.5), pct(ts, 0.99)
                row[f"{name}_mean_us"] = statistics.fmean(ts) * 1e6
            for name in ("grpc", "dist"):
                row[f"{name}_overhead_p50_us"] = row[f"{name}_p50_us"] - row["local_p50_us"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,8,32,128,512")
    ap.add_argument("--hidden", default="1024,4096")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="emoe-bench", log_to_driver=False)
    torch.set_num_threads(1)
    rows = []
    tokens = [int(t) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in [int(h) for h in args.hidden.split(",")]:
            path = synthetic_checkpoint(Path(tmp) / f"h{hidden}", hidden)
            rows += asyncio.run(measure(path, hidden, tokens, args.iters))
    ray.shutdown()
    print(render(rows))
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


def render(rows: list[dict]) -> str:
    head = "| hidden | tokens | local p50 | grpc p50 / p99 | grpc overhead p50 | dist p50 / p99 | dist overhead p50 |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['tokens']} | {r['local_p50_us']:.0f} µs "
            f"| {r['grpc_p50_us']:.0f} / {r['grpc_p99_us']:.0f} µs | {r['grpc_overhead_p50_us']:.0f} µs "
            f"| {r['dist_p50_us']:.0f} / {r['dist_p99_us']:.0f} µs | {r['dist_overhead_p50_us']:.0f} µs |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
