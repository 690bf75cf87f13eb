"""`emoe bench agent`: an agent-shaped multi-turn workload with automatic prefix caching on and off.

    emoe bench agent [--model DIR | --preset bench-small] [--sessions 8] [--turns 10] [--system 1500]
                     [--per-turn 200] [--output-len 32] [--tool-time 0] [--rounds 1] [--routers 2]
                     [--no-caching-modes] [--out bench-results/agent]

`sessions` concurrent sessions, each a conversation of `turns` turns: every prompt is the shared system
prompt (`system` tokens, the same for every session), then the session's own history — each earlier
turn's user/tool addition (`per-turn` tokens, what a tool result adds) and the model's reply to it — then
the new addition. Each session sends its next turn when its previous reply has finished (after a tool
call of `--tool-time` seconds on average, exponentially distributed, seeded; default 0), as an agent does.
One in-process AsyncEngine per mode (prefix caching on, off), the modes in turn (`rounds` times each), on
the same model and the same token streams. With `--routers N` (default 2) two more modes, caching on:
N router engines in this process sharing the model, each with 1/N of the KV pool (the same memory), a
request going to one of them by the prefix-aware policy of `cluster.prefix_routing` (what the Router
deployment's Serve request router runs) or by round robin.

Reported per mode: TTFT p50 / p99 (submission to first token), prompt tokens sent and actually computed
(sent minus prefix-cache hits), hit rate, output tokens/s over the run and its wall time; and the ratios
on / off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.perf import _machine
from cluster.prefix_routing import PrefixAffinity
from emoe.api import GenerateRequest, SamplingParams
from emoe.demo import write_demo_model
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emoe bench agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a preset)")
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system", type=int, default=1500, help="tokens of the shared system prompt")
    ap.add_argument("--per-turn", type=int, default=200, help="tokens each turn adds (a tool result)")
    ap.add_argument("--output-len", type=int, default=32, help="tokens of each reply")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--tool-time", type=float, default=0.0, help="mean seconds an agent's tool runs between turns (exp.)"
    )
    ap.add_argument(
        "--routers",
        type=int,
        default=2,
        help="also N router engines: prefix-aware vs round robin vs power of two (1: skip)",
    )
    ap.add_argument(
        "--no-caching-modes",
        dest="caching_modes",
        action="store_false",
        help="only the router modes (not the one-engine cache on / off pair)",
    )
    ap.add_argument("--kv-blocks", type=int, default=0, help="default: room for every session's history")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/agent"), help="writes OUT.md/.json")
    return ap


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


ROUTINGS = ("prefix-aware", "round robin", "power of two")


class Front:
    """Which of `n` router engines takes a request: `prefix-aware` (cluster.prefix_routing's policy, the
    one the Serve deployment's request router runs), `round robin`, or `power of two` (Ray Serve's default
    request router: two replicas at random, the one with fewer requests in flight)."""

    def __init__(self, n: int, routing: str, seed: int = 0):
        self.n, self.routing, self.next = n, routing, 0
        self.policy = PrefixAffinity()
        self.rng = random.Random(seed)
        self.load = [0] * n

    def pick(self, prompt: list[int]) -> int:
        if self.routing == "round robin":
            self.next += 1
            r = (self.next - 1) % self.n
        elif self.routing == "power of two":
            a, b = self.rng.sample(range(self.n), 2) if self.n > 1 else (0, 0)
            r = a if self.load[a] <= self.load[b] else b
        else:
            r = self.policy.rank(list(range(self.n)), prompt)[0][0]
            self.policy.routed(r, prompt)
        self.load[r] += 1
        return r

    def done(self, r: int) -> None:
        self.load[r] -= 1
        if self.routing == "prefix-aware":
            self.policy.completed(r)


async def run_mode(
    engine: Engine, args, cached: bool, kv_blocks: int, routers: int = 1, routing: str = "prefix-aware"
) -> dict:
    """One mode: `routers` engines (each with kv_blocks / routers blocks: the same memory in all) behind
    a `routing` front."""
    per_router = kv_blocks // routers
    cfg = EngineConfig(
        kv_blocks=per_router,
        max_num_seqs=max(64, args.sessions),
        max_context=per_router * 16,
        prefix_caching=cached,
    )
    engines = [AsyncEngine(engine.spec, engine.model, engine.dispatcher, cfg) for _ in range(routers)]
    front = Front(routers, routing, args.seed)
    vocab = engine.spec.vocab_size
    rng = random.Random(args.seed)  # the same token streams for both modes
    system = [rng.randrange(3, vocab) for _ in range(args.system)]
    additions = [
        [[rng.randrange(3, vocab) for _ in range(args.per_turn)] for _ in range(args.turns)]
        for _ in range(args.sessions)
    ]
    ttfts: list[float] = []
    pauses = [random.Random(args.seed * 1000 + s) for s in range(args.sessions)]  # the same in every mode
    sent = outputs = 0

    async def session(s: int) -> None:
        nonlocal sent, outputs
        history: list[int] = []
        for t in range(args.turns):
            prompt = system + history + additions[s][t]
            sampling = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len)
            t0 = time.perf_counter()
            reply: list[int] = []
            r = front.pick(prompt)
            async for chunk in engines[r].generate(GenerateRequest(f"s{s}t{t}", tuple(prompt), sampling)):
                if chunk.token_ids and not reply:
                    ttfts.append(time.perf_counter() - t0)
                reply.extend(chunk.token_ids)
            front.done(r)
            sent += len(prompt)
            outputs += len(reply)
            history = history + additions[s][t] + reply
            if args.tool_time > 0 and t + 1 < args.turns:  # the agent runs the tool before its next turn
                await asyncio.sleep(pauses[s].expovariate(1 / args.tool_time))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(session(i) for i in range(args.sessions)))
        wall = time.perf_counter() - t0
        each = [ae.stats() for ae in engines]
    finally:
        for ae in engines:
            await ae.close()
    st = {k: sum(e[k] for e in each) for k in ("prefix_cache_hits", "prefix_cache_evictions", "preemptions")}
    computed = sent - st["prefix_cache_hits"]
    mode = "cache on" if cached else "cache off"
    return {
        "mode": mode if routers == 1 else f"{routers} routers, {routing}",
        "requests": len(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        "prompt_tokens_sent": sent,
        "prompt_tokens_computed": computed,
        "computed_share": computed / sent,
        "hit_rate": st["prefix_cache_hits"] / sent,
        "output_tok_s": outputs / wall,
        "wall_s": wall,
        "evictions": st["prefix_cache_evictions"],
        "preemptions": st["preemptions"],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    longest = args.system + args.turns * (args.per_turn + args.output_len)
    kv_blocks = args.kv_blocks or -(-longest * args.sessions // 16) + 64
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_demo_model(Path(tmp) / args.preset, preset=args.preset, dtype=args.dtype)
        with Engine.from_pretrained(path, dtype=args.dtype) as engine:
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            warm = argparse.Namespace(**{**vars(args), "sessions": 2, "turns": 2, "seed": args.seed + 1})
            asyncio.run(run_mode(engine, warm, False, kv_blocks))  # warm-up: kernels, allocator
            modes = [(True, 1, ""), (False, 1, "")] if args.caching_modes else []
            if args.routers > 1:
                modes += [(True, args.routers, r) for r in ROUTINGS]
            runs: dict[tuple, list[dict]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for m in modes:
                    r = asyncio.run(run_mode(engine, args, m[0], kv_blocks, m[1], m[2] or "prefix-aware"))
                    print(f"[bench] {r}", file=sys.stderr)
                    runs[m].append(r)
            spec = engine.spec
    rows = []
    for rs in runs.values():
        rows.append(
            {
                k: statistics.median(r[k] for r in rs) if not isinstance(rs[0][k], str) else rs[0][k]
                for k in rs[0]
            }
        )
    by_mode = {r["mode"]: r for r in rows}
    head = (
        f"Model `{spec.family}` {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_experts} experts,"
        f" {args.dtype}; in process. Machine: {_machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. {started}.\n"
        f"{args.sessions} sessions × {args.turns} turns, {args.system}-token shared system prompt, "
        f"+{args.per_turn} tokens per turn, {args.output_len}-token replies"
        + (f", tool calls of {args.tool_time} s mean between turns" if args.tool_time else "")
        + f"; {args.rounds} round(s), the modes "
        f"in turn, medians over rounds; {kv_blocks} KV blocks of 16.\n"
    )
    table = [
        "| mode | TTFT p50 (ms) | TTFT p99 (ms) | prompt tokens sent | computed | computed / sent | hit rate | "
        "output tok/s | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['mode']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['prompt_tokens_sent']:.0f} | "
        f"{r['prompt_tokens_computed']:.0f} | {r['computed_share']:.1%} | {r['hit_rate']:.1%} | "
        f"{r['output_tok_s']:.1f} | {r['wall_s']:.1f} |"
        for r in rows
    ]
    ratios = "\n"
    on, off = by_mode.get("cache on"), by_mode.get("cache off")
    if on and off:
        ratios += (
            f"TTFT p50 off / on: **{off['ttft_p50_ms'] / on['ttft_p50_ms']:.1f}×**; TTFT p99 off / on: "
            f"{off['ttft_p99_ms'] / on['ttft_p99_ms']:.1f}×; output tok/s on / off: "
            f"{on['output_tok_s'] / off['output_tok_s']:.2f}×; prompt tokens computed with caching: "
            f"{on['computed_share']:.1%} of those sent.\n"
        )
    aware = by_mode.get(f"{args.routers} routers, prefix-aware")
    if aware:
        ratios += (
            f"{args.routers} router engines, {kv_blocks // args.routers} KV blocks each (the one engine's pool "
            f"split), caching on: hit rate prefix-aware {aware['hit_rate']:.1%}"
        )
        for other in ROUTINGS[1:]:
            r = by_mode[f"{args.routers} routers, {other}"]
            ratios += (
                f"; / {other} ({r['hit_rate']:.1%}) **{aware['hit_rate'] / r['hit_rate']:.2f}×**"
                f" (TTFT p50 {r['ttft_p50_ms'] / aware['ttft_p50_ms']:.1f}× prefix-aware's)"
            )
        ratios += ".\n"
    md = head + "\n" + "\n".join(table) + "\n" + ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out), "model": str(args.model)}, "rows": rows}, indent=1
        )
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
