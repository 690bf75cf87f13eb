"""`emoe bench`: one workload, side by side, against transformers, the in-process engine and the cluster.

    emoe bench [--model DIR | --preset bench-small] [--requests 64] [--concurrency 32] [--rate R]
               [--prompt-len 16:512] [--output-len 32:256] [--backends transformers,inprocess,grpc,dist]
               [--dtype bfloat16] [--groups 4] [--out docs/perf-cpu]

Backends, all fed the same requests (random token ids, greedy, eos ignored, seeded):
  transformers  `AutoModelForCausalLM.generate` on the same checkpoint, static batches of up to
                `concurrency` requests (left padding); token times come from a logits processor, i.e. the
                moment each step's logits exist, as if the batch streamed
  inprocess     the AsyncEngine (continuous batching, paged KV) with the experts in this process
  grpc / dist   the same AsyncEngine as a router here, the experts in `groups` Ray actors reached over the
                gRPC or the torch.distributed data plane (`--micro-batches 2`: ping-pong)
Load: closed loop of `concurrency` clients, or (`--rate`) Poisson arrivals at R requests/s.

Reported per backend: output tokens/s, TTFT and TPOT p50 / p99, each as a ratio to `inprocess`; the
fraction of requests whose tokens equal `inprocess`'s; and `inprocess`'s fraction of the memory-bandwidth
roofline (DESIGN §8): per decode step, the bytes of weights it touches (every dense tensor, the experts
its tokens were routed to, the KV it reads) over the machine's measured read bandwidth (a sum over a tensor
far larger than the caches), against the step's measured time. Writes OUT.md, OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BACKENDS = ("transformers", "inprocess", "grpc", "dist")


# ---- workload -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    requests: int = 64
    prompt_len: tuple[int, int] = (16, 512)
    output_len: tuple[int, int] = (32, 256)
    concurrency: int = 32
    rate: float | None = None  # requests/s (Poisson); None = closed loop of `concurrency` clients
    seed: int = 0

    def make(self, vocab: int) -> list[tuple[list[int], int, float]]:
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


# ---- memory bandwidth and the roofline ----------------------------------------------------------------
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


@dataclass
class StepRecord:
    seconds: float
    decode_only: bool
    batch: int  # sequences in the step
    tokens: int
    bytes_touched: int


class Roofline:
    """Bytes a step touches: every dense tensor once, each routed-to expert once per layer, the KV read."""

    def __init__(self, spec, dtype: torch.dtype):
        from emoe.layout import expert_shapes, router_tensors

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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class CountingDispatcher:
    """Wraps the in-process dispatcher: counts the distinct experts each layer's tokens go to."""

    def __init__(self, inner, roofline: Roofline):
        self.inner, self.roofline = inner, roofline

    @property
    def placement(self):
        return self.inner.placement

    async def forward(self, layer, hidden, topk_ids, topk_weights):
        self.roofline.experts_touched += int(torch.unique(topk_ids).numel())
        return await self.inner.forward(layer, hidden, topk_ids, topk_weights)

    def begin_step(self) -> None:
        self.inner.begin_step()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


# ---- engine backends (in-process and cluster) -----------------------------------------------------------
def run_engine(
    path: Path,
    backend: str,
    work: list[tuple[list[int], int, float]],
    workload: Workload,
    dtype: str,
    groups: int,
    micro_batches: int = 1,
    expert_threads: int = 1,
    roofline_bw: float | None = None,
    device: str = "cpu",
) -> tuple[list[RequestResult], dict[str, Any]]:
    from emoe.api import GenerateRequest, SamplingParams
    from router import Engine
    from router.engine.async_engine import AsyncEngine, EngineConfig

    dispatcher = "local" if backend == "inprocess" else backend
    opts = {} if dispatcher == "local" else {"torch_threads": expert_threads}
    engine = Engine.from_pretrained(
        path, dtype=dtype, dispatcher=dispatcher, num_groups=groups, device=device, **opts
    )
    extra: dict[str, Any] = {}
    try:
        roof = Roofline(engine.spec, engine.model.dtype) if roofline_bw else None
        disp = CountingDispatcher(engine.dispatcher, roof) if roof else engine.dispatcher
        longest = max(max(len(p) + n for p, n, _ in work), 16)  # and the warm-up requests
        cfg = EngineConfig(
            kv_blocks=max(256, workload.concurrency * (longest // 16 + 2)),
            block_size=16,
            max_batch_tokens=512,
            max_num_seqs=max(workload.concurrency, 1),
            max_queue=len(work) + 1,
            max_context=longest + 1,
            micro_batches=micro_batches,
        )
        aeng = AsyncEngine(engine.spec, engine.model, disp, cfg)
        steps: list[StepRecord] = []

        def on_step(seconds: float, chunks) -> None:
            decode = all(c.n == 1 for c in chunks)
            tokens = sum(c.n for c in chunks)
            nbytes = 0
            if roof is not None:
                nbytes = roof.step_bytes(tokens, sum(c.start + c.n for c in chunks))
                roof.experts_touched = 0
            steps.append(StepRecord(seconds, decode, len(chunks), tokens, nbytes))

        aeng.on_step = on_step

        async def client(i: int, prompt: list[int], n: int, arrival: float, t0: float) -> RequestResult:
            times, toks = [], []
            req = GenerateRequest(f"bench-{i}", tuple(prompt), SamplingParams(max_tokens=n, ignore_eos=True))
            async for chunk in aeng.generate(req):
                now = time.perf_counter()
                for t in chunk.token_ids:
                    toks.append(t)
                    times.append(now)
            return RequestResult(toks, t0 + arrival, times)

        async def drive() -> tuple[list[RequestResult], float]:
            results: list[RequestResult | None] = [None] * len(work)
            t0 = time.perf_counter()
            if workload.rate:

                async def at(i, p, n, a):
                    await asyncio.sleep(max(0.0, t0 + a - time.perf_counter()))
                    results[i] = await client(i, p, n, a, t0)

                await asyncio.gather(*(at(i, p, n, a) for i, (p, n, a) in enumerate(work)))
            else:
                queue = list(enumerate(work))
                queue.reverse()

                async def worker():
                    while queue:
                        i, (p, n, _) = queue.pop()
                        results[i] = await client(i, p, n, time.perf_counter() - t0, t0)

                await asyncio.gather(*(worker() for _ in range(workload.concurrency)))
            wall = time.perf_counter() - t0
            await aeng.close()
            return results, wall

        # warm-up: one short request (allocators, connections, one-time kernels)
        warm = Workload(requests=2, prompt_len=(8, 8), output_len=(4, 4), concurrency=2)
        engine._run(_warm(aeng, warm.make(engine.spec.vocab_size)))
        steps.clear()
        results, wall = engine._run(drive())
        extra["wall_s"] = wall
        if roof is not None:
            extra["roofline"] = roofline_summary(steps, roofline_bw, workload.concurrency, roof)
        full = [s.seconds for s in steps if s.decode_only and s.batch >= workload.concurrency]
        extra["decode_step_ms_median"] = statistics.median(full) * 1e3 if full else float("nan")
        lat = engine.dispatcher.stats().get("dispatch_latency_s")
        if lat is not None:  # remote dispatchers time every group call
            extra["expert_call_ms_mean"] = lat["sum"] / lat["count"] * 1e3 if lat["count"] else float("nan")
    finally:
        engine.close()
    return results, extra


async def _warm(aeng, work) -> None:
    from emoe.api import GenerateRequest, SamplingParams

    async def one(i, p, n):
        req = GenerateRequest(f"warm-{i}-{uuid.uuid4().hex[:6]}", tuple(p), SamplingParams(max_tokens=n))
        async for _ in aeng.generate(req):
            pass

    await asyncio.gather(*(one(i, p, n) for i, (p, n, _) in enumerate(work)))


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


# ---- transformers backend ----------------------------------------------------------------------------
def run_transformers(
    path: Path, work: list[tuple[list[int], int, float]], workload: Workload, dtype: str, device: str = "cpu"
) -> tuple[list[RequestResult], dict[str, Any]]:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    def generate_batch(batch: list[tuple[list[int], int]]) -> list[tuple[list[int], list[float]]]:
        longest = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        new = max(n for _, n in batch)
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        gen = out[:, longest:]
        return [(gen[i, :n].tolist(), clock.times[:n]) for i, (_, n) in enumerate(batch)]

    generate_batch([(work[0][0][:8], 2)])  # warm-up
    results: list[RequestResult | None] = [None] * len(work)
    t0 = time.perf_counter()
    pending = list(range(len(work)))
    while pending:
        now = time.perf_counter() - t0
        arrived = [i for i in pending if work[i][2] <= now]
        if not arrived:  # open loop: wait for the next arrival
            time.sleep(max(0.0, work[pending[0]][2] - now))
            continue
        batch = arrived[: workload.concurrency]
        start = time.perf_counter()
        outs = generate_batch([(work[i][0], work[i][1]) for i in batch])
        for i, (toks, times) in zip(batch, outs, strict=True):
            arrival = t0 + work[i][2] if workload.rate else start
            results[i] = RequestResult(toks, arrival, times)
        pending = [i for i in pending if i not in set(batch)]
    wall = time.perf_counter() - t0
    return results, {"wall_s": wall}


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    meta: dict[str, Any]
    workload: dict[str, Any]
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ratios(self) -> None:
        base = self.backends.get("inprocess")
        if not base:
            return
        for b in self.backends.values():
            for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"):
                b[f"{k}_vs_inprocess"] = b[k] / base[k] if base[k] else float("nan")


def match_fraction(a: list[RequestResult], b: list[RequestResult]) -> float:
    return sum(x.tokens == y.tokens for x, y in zip(a, b, strict=True)) / len(a)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(
    path: Path,
    workload: Workload,
    backends: Sequence[str],
    dtype: str = "bfloat16",
    groups: int = 4,
    micro_batches: int = 1,
    threads: int | None = None,
    expert_threads: int = 1,
    roofline: bool = True,
    router_threads: int = 1,
    device: str = "cpu",
) -> BenchReport:
    """`threads`: torch threads of transformers and the in-process engine (default: every CPU);
    `router_threads`: of the router when its experts are other processes on this machine (default 1: a
    router's idle OpenMP threads spin and take cores from the expert processes)."""
    unknown = [b for b in backends if b.split("@")[0] not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choices: {', '.join(BACKENDS)}")
    threads = threads or os.cpu_count() or 1
    with torch_threads(threads):
        from emoe.spec import ModelSpec

        spec = ModelSpec.from_pretrained(path)
        work = workload.make(spec.vocab_size)
        bw = read_bandwidth(device=device) if roofline else None
        report = BenchReport(
            meta={
                "machine": _machine(device),
                "device": device,
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": threads,
                "model": str(path),
                "family": spec.family,
                "layers": spec.num_layers,
                "hidden": spec.hidden_size,
                "experts": spec.num_experts,
                "top_k": spec.top_k,
                "dtype": dtype,
                "groups": groups,
                "micro_batches": micro_batches,
                "expert_threads": expert_threads,
                "router_threads": router_threads,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
            workload={**asdict(workload)},
        )
        outputs: dict[str, list[RequestResult]] = {}
        for b in backends:
            print(f"[bench] {b} ...", file=sys.stderr, flush=True)
            if b == "transformers":
                results, extra = run_transformers(path, work, workload, dtype, device)
            else:
                name, _, mb = b.partition("@")  # "grpc@2": two micro-batches
                with torch_threads(threads if name == "inprocess" else router_threads):
                    results, extra = run_engine(
                        path,
                        name,
                        work,
                        workload,
                        dtype,
                        groups,
                        micro_batches=1 if name == "inprocess" else int(mb or micro_batches),
                        expert_threads=expert_threads,
                        roofline_bw=bw if name == "inprocess" else None,
                        device=device,
                    )
            outputs[b] = results
            summary = summarize(results, extra.pop("wall_s"))
            summary.update(extra)
            report.backends[b] = summary
            print(f"[bench] {b}: {json.dumps(_short(summary))}", file=sys.stderr, flush=True)
        if "inprocess" in outputs:
            for b, res in outputs.items():
                report.backends[b]["same_tokens_as_inprocess"] = match_fraction(res, outputs["inprocess"])
        report.ratios()
        return report


def _short(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items() if not isinstance(v, dict)}


def _machine(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- output -------------------------------------------------------------------------------------------
def render_markdown(report: BenchReport) -> str:
    m, w = report.meta, report.workload
    lines = [
        f"Model `{m['family']}` {m['layers']} layers, hidden {m['hidden']}, {m['experts']} experts top-"
        f"{m['top_k']}, {m['dtype']}; {m['groups']} expert groups. Machine: {m['machine']}, "
        f"{m['cpus']} CPUs, torch {m['torch']}: {m['torch_threads']} threads in process; the cluster's router "
        f"{m.get('router_threads', '?')}, each expert replica {m['expert_threads']}. {m['date']}.",
        f"Workload: {w['requests']} requests, prompts {w['prompt_len'][0]}–{w['prompt_len'][1]}, outputs "
        f"{w['output_len'][0]}–{w['output_len'][1]} tokens, "
        + (f"Poisson {w['rate']} req/s" if w["rate"] else f"{w['concurrency']} concurrent")
        + f", seed {w['seed']}.",
        "",
        "| backend | output tok/s | × in-process | TTFT p50 / p99 (s) | × | TPOT p50 / p99 (ms) | × "
        "| same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in report.backends.items():
        lines.append(
            f"| {name} | {b['tokens_per_s']:.1f} | {_x(b, 'tokens_per_s')} "
            f"| {b['ttft_p50_s']:.2f} / {b['ttft_p99_s']:.2f} | {_x(b, 'ttft_p50_s')} "
            f"| {b['tpot_p50_s'] * 1e3:.1f} / {b['tpot_p99_s'] * 1e3:.1f} | {_x(b, 'tpot_p50_s')} "
            f"| {b.get('same_tokens_as_inprocess', float('nan')):.0%} |"
        )
    roof = report.backends.get("inprocess", {}).get("roofline")
    if roof:
        lines += [
            "",
            f"Roofline (in-process): read bandwidth {roof['bandwidth_gb_s']:.1f} GB/s; a full decode step "
            f"(batch {roof['batch']:.0f}) touches {roof['bytes_per_step_median'] / 1e6:.0f} MB: floor "
            f"{roof['floor_ms_median']:.1f} ms, measured {roof['step_ms_median']:.1f} ms (median of "
            f"{roof['decode_steps']} steps) → **{roof['fraction']:.0%} of the roofline**.",
        ]
    sc = report.backends.get("inprocess", {}).get("scaling")
    if sc:
        pairs = ", ".join(
            f"{e} experts {t:.1f} tok/s" for e, t in zip(sc["experts"], sc["tokens_per_s"], strict=True)
        )
        lines += [
            "",
            f"MoE scaling (in-process, 1 stream, top-{m['top_k']}): {pairs} → drop {sc['drop']:.1%}.",
        ]
    return "\n".join(lines) + "\n"


def _x(b: dict, key: str) -> str:
    v = b.get(f"{key}_vs_inprocess")
    return "–" if v is None else f"{v:.2f}×"


COLORS = {
    "transformers": "#888",
    "inprocess": "#2a6",
    "grpc": "#36c",
    "dist": "#c63",
    "grpc@2": "#69e",
    "dist@2": "#e96",
}


def write_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.backends)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    specs = [
        ("tokens_per_s", 1.0, "output tokens/s", None),
        ("ttft_p50_s", 1.0, "TTFT (s), p50 bar / p99 tick", "ttft_p99_s"),
        ("tpot_p50_s", 1e3, "TPOT (ms), p50 bar / p99 tick", "tpot_p99_s"),
    ]
    for ax, (key, scale, title, p99) in zip(axes, specs, strict=True):
        vals = [report.backends[n][key] * scale for n in names]
        bars = ax.bar(names, vals, color=[COLORS.get(n, "#cc3") for n in names])
        if p99:
            ax.scatter(names, [report.backends[n][p99] * scale for n in names], marker="_", s=400, c="k")
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    m = report.meta
    fig.suptitle(f"{m['family']} {m['experts']}×top-{m['top_k']} {m['dtype']} on {m['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(report: BenchReport, out: Path) -> dict[str, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": out.with_suffix(".md"), "json": out.with_suffix(".json"), "png": out.with_suffix(".png")}
    paths["md"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(asdict(report), indent=2, default=float))
    write_plot(report, paths["png"])
    return paths


# ---- MoE scaling ---------------------------------------------------------------------------------------
def scaling(base_preset: str, experts: Sequence[int], workload: Workload, dtype: str, tmp: Path) -> dict:
    """Throughput of the in-process engine at the given expert counts (same top-k, same expert size)."""
    from emoe.demo import write_demo_model

    rows = {}
    for e in experts:
        path = write_demo_model(tmp / f"e{e}", preset=base_preset, dtype=dtype, num_local_experts=e)
        res, extra = run_engine(path, "inprocess", workload.make(_vocab(path)), workload, dtype, 1)
        rows[e] = summarize(res, extra["wall_s"])
        print(f"[bench] {e} experts: {rows[e]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        shutil.rmtree(path)
    first = rows[experts[0]]["tokens_per_s"]
    return {
        "experts": list(experts),
        "tokens_per_s": [rows[e]["tokens_per_s"] for e in experts],
        "drop": 1 - rows[experts[-1]]["tokens_per_s"] / first,
    }


def _vocab(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


# ---- command line --------------------------------------------------------------------------------------
def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 0 < lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 0 < LO <= HI, got {text!r}")
    return lo_i, hi_i


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emoe bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: --preset)")
    ap.add_argument(
        "--preset", default="bench-small", help="demo-model preset written when --model is absent"
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals (requests/s) instead")
    ap.add_argument("--prompt-len", type=_range, default=(16, 512))
    ap.add_argument("--output-len", type=_range, default=(32, 256))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="grpc@2 = grpc with 2 micro-batches")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=1, choices=[1, 2])
    ap.add_argument("--threads", type=int, default=None, help="torch threads here (default: all CPUs)")
    ap.add_argument("--expert-threads", type=int, default=1, help="torch threads per expert replica")
    ap.add_argument("--router-threads", type=int, default=1, help="torch threads of the cluster's router")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] for transformers and the router")
    ap.add_argument(
        "--scaling", default=None, help="also: in-process 1-stream throughput at E1,E2,... experts"
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results/perf"), help="writes OUT.md/.json/.png")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workload = Workload(
        requests=args.requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        concurrency=args.concurrency,
        rate=args.rate,
        seed=args.seed,
    )
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from emoe.demo import write_demo_model

            print(f"[bench] writing the {args.preset} model ...", file=sys.stderr, flush=True)
            path = write_demo_model(Path(tmp) / args.preset, preset=args.preset, dtype=args.dtype)
        if any(b.split("@")[0] in ("grpc", "dist") for b in backends):
            from cluster.launch import ensure_ray

            ensure_ray(num_cpus=os.cpu_count(), log_to_driver=False)
        report = run(
            path,
            workload,
            backends,
            dtype=args.dtype,
            groups=args.groups,
            micro_batches=args.micro_batches,
            threads=args.threads,
            expert_threads=args.expert_threads,
            router_threads=args.router_threads,
            device=args.device,
        )
        if args.scaling:
            counts = [int(e) for e in args.scaling.split(",")]
            one = Workload(requests=4, prompt_len=(32, 32), output_len=(64, 64), concurrency=1)
            report.meta["scaling_workload"] = asdict(one)
            report.backends["inprocess"]["scaling"] = scaling(args.preset, counts, one, args.dtype, Path(tmp))
    paths = write_outputs(report, args.out)
    print(render_markdown(report))
    sc = report.backends.get("inprocess", {}).get("scaling")
    if sc:
        print(f"MoE scaling at 1 stream: {sc}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
