"""`emoe bench sampling`: what logprobs and structured outputs cost the decode step, side by side.

    emoe bench sampling [--model DIR | --preset bench-small] [--streams 16] [--output-len 48] [--rounds 3]
                        [--dtype bfloat16] [--out bench-results/sampling]

One in-process AsyncEngine; per variant, `streams` concurrent requests (random prompts of 32 tokens,
temperature 1, seeded, eos masked by min_tokens so every stream decodes `output-len` tokens). Variants run
in turn, `rounds` times (plain, logprobs, ..., plain, logprobs, ...), so machine noise lands on all of them.
Reported: the median time of a decode step with all `streams` sequences in it, decode tokens/s
(streams / step time) and the ratio to `plain`; and, since a whole step's noise can hide a cost of a few
milliseconds, the sampler alone: the median time of one `sample(logits [streams, vocab])` call per variant
(grammar bitmask fill and apply, logprobs, the draw; the matcher advanced as in the engine), interleaved
over 50 repetitions (fewer than the JSON array's 64 items: no grammar ends). Structured variants use grammars that cannot end within
the output length once eos is masked (a regex of words; a JSON array of at least 64 integers), so their
streams decode as long as the plain ones.
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
from emoe.api import GenerateRequest, GrammarSpec, SamplingParams
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig
from router.engine.structured import Grammars

# a JSON array of at least 64 integers: it cannot close within the benchmark's output length
LONG_ARRAY = {"type": "array", "items": {"type": "integer"}, "minItems": 64}
VARIANTS: dict[str, dict] = {
    "plain": {},
    "logprobs=1": {"logprobs": 1},
    "logprobs=20": {"logprobs": 20},
    "regex": {"structured": GrammarSpec("regex", "([a-z]+ )+")},
    "json schema": {"structured": GrammarSpec("json", json.dumps(LONG_ARRAY))},
    "regex + logprobs=5": {"logprobs": 5, "structured": GrammarSpec("regex", "([a-z]+ )+")},
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emoe bench sampling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a preset)")
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/sampling"), help="writes OUT.md/.json")
    return ap


async def measure(engine: Engine, tok: Tokenizer, args, variants: list[str]) -> dict[str, list[float]]:
    ae = AsyncEngine(
        engine.spec, engine.model, engine.dispatcher, EngineConfig(max_num_seqs=args.streams), tok
    )
    steps: list[tuple[float, int]] = []
    ae.on_step = lambda seconds, chunks: steps.append(
        (seconds, len(chunks) if all(c.n == 1 for c in chunks) else -1)
    )
    rng = random.Random(args.seed)
    vocab = min(tok.vocab_size, engine.spec.vocab_size)
    times: dict[str, list[float]] = {v: [] for v in variants}
    counter = 0

    finishes: dict[str, dict[str, int]] = {v: {} for v in variants}

    async def one(fields: dict, n: int, v: str = "") -> None:
        nonlocal counter
        counter += 1
        prompt = tuple(rng.randrange(vocab) for _ in range(32))
        sampling = SamplingParams(max_tokens=n, min_tokens=n, temperature=1.0, seed=counter, **fields)
        async for chunk in ae.generate(GenerateRequest(f"b{counter}", prompt, sampling)):
            if chunk.finish_reason and v:
                finishes[v][chunk.finish_reason] = finishes[v].get(chunk.finish_reason, 0) + 1

    try:
        for v in variants:  # warm-up: compile grammars, fill caches
            await asyncio.gather(*(one(VARIANTS[v], 4) for _ in range(args.streams)))
        for _ in range(args.rounds):
            for v in variants:
                steps.clear()
                await asyncio.gather(*(one(VARIANTS[v], args.output_len, v) for _ in range(args.streams)))
                times[v] += [s for s, batch in steps if batch == args.streams]
    finally:
        await ae.close()
    print(f"[bench] finish reasons: {finishes}", file=sys.stderr)
    return times


def sampler_alone(engine: Engine, tok: Tokenizer, args, variants: list[str], reps: int = 50) -> dict:
    """variant -> median seconds of one batched `sample` call over [streams, vocab] logits."""
    from router.engine.sampling import SequenceSampling, sample

    async def matchers(spec, n):
        grammars = Grammars(tok.path, engine.spec.vocab_size, tuple(engine.spec.eos_token_ids))
        try:
            return [await grammars.matcher(spec) for _ in range(n)]
        finally:
            grammars.close()

    gen = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.streams, engine.spec.vocab_size, generator=gen)
    seqs: dict[str, list[SequenceSampling]] = {}
    stops = frozenset(engine.spec.eos_token_ids)
    for v in variants:
        fields = VARIANTS[v]
        # eos masked (min_tokens), as in the engine run: the grammars never end
        params = SamplingParams(max_tokens=10_000, min_tokens=10_000, temperature=1.0, seed=1, **fields)
        ms = asyncio.run(matchers(fields["structured"], args.streams)) if "structured" in fields else None
        seqs[v] = [
            SequenceSampling(params, stops, output=[], grammar=ms[i] if ms else None)
            for i in range(args.streams)
        ]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            t0 = time.perf_counter()
            ids, _ = sample(logits, seqs[v])
            for s, tok_id in zip(seqs[v], ids, strict=True):
                if s.grammar is not None:
                    s.grammar.accept(tok_id)
                s.output.append(tok_id)
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_demo_model(Path(tmp) / args.preset, preset=args.preset, dtype=args.dtype)
        tok = Tokenizer(path)
        with Engine.from_pretrained(path, dtype=args.dtype) as engine:
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            times = asyncio.run(measure(engine, tok, args, variants))
            alone = sampler_alone(engine, tok, args, variants)
            spec = engine.spec
    base = statistics.median(times["plain"])
    rows = []
    for v in variants:
        ms = statistics.median(times[v]) * 1e3
        rows.append(
            {
                "variant": v,
                "step_ms": ms,
                "tok_s": args.streams / ms * 1e3,
                "vs_plain": base * 1e3 / ms,
                "steps": len(times[v]),
                "sample_ms": alone[v] * 1e3,
            }
        )
    cpu = _machine()
    head = (
        f"Model `{spec.family}` {spec.num_layers} layers, hidden {spec.hidden_size}, vocab "
        f"{spec.vocab_size}, {args.dtype}; in process. Machine: {cpu}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. {started}.\n"
        f"{args.streams} streams × {args.output_len} tokens, {args.rounds} rounds, variants interleaved.\n"
    )
    table = [
        "| variant | decode step p50 (ms) | decode tok/s | × plain | steps | sampler alone p50 (ms) | + vs plain (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['variant']} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | {r['vs_plain']:.2f}× | {r['steps']} | "
        f"{r['sample_ms']:.2f} | {r['sample_ms'] - rows[0]['sample_ms']:+.2f} |"
        for r in rows
    ]
    md = head + "\n" + "\n".join(table) + "\n"
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
