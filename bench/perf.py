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
  NAME@OPTS     a variant of an engine backend: `@2` two micro-batches, `@nocache` automatic prefix
                caching off (on by default, as in `emoe serve`), joined with `+` (`grpc@2+nocache`)
Load: closed loop of `concurrency` clients, or (`--rate`) Poisson arrivals at R requests/s.

Reported per backend: output tokens/s, TTFT and TPOT p50 / p99, each as a ratio to `inprocess`; the
fraction of requests whose tokens equal `inprocess`'s; and `inprocess`'s fraction of the memory-bandwidth
roofline (DESIGN §8): per decode step, the bytes of weights it touches (every dense tensor, the experts
its tokens were routed to, the KV it reads) over the machine's measured read bandwidth (a sum over a tensor
far larger than the caches), against the step's measured time. Writes OUT.md, OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.backends import run_engine, run_transformers
from bench.report import BenchReport, render_markdown, write_outputs
from bench.roofline import read_bandwidth
from bench.workload import RequestResult, Workload, match_fraction, summarize
from emoe.demo import write_demo_model
from emoe.spec import ModelSpec

BACKENDS = ("transformers", "inprocess", "grpc", "dist")


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
    rounds: int = 1,
) -> BenchReport:
    """`threads`: torch threads of transformers and the in-process engine (default: every CPU);
    `router_threads`: of the router when its experts are other processes on this machine (default 1: a
    router's idle OpenMP threads spin and take cores from the expert processes)."""
    unknown = [b for b in backends if b.split("@")[0] not in BACKENDS]
    unknown += [b for b in backends if any(o not in ("", "nocache") and not o.isdigit() for o in _opts(b))]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choices: {', '.join(BACKENDS)}")
    threads = threads or os.cpu_count() or 1
    with torch_threads(threads):
        spec = ModelSpec.from_pretrained(path)
        work = workload.make(spec.vocab_size)
        bw = read_bandwidth(device=device) if roofline else None
        settings = {
            "dtype": dtype,
            "groups": groups,
            "micro_batches": micro_batches,
            "expert_threads": expert_threads,
            "router_threads": router_threads,
            "rounds": rounds,
        }
        report = BenchReport(meta=describe(path, spec, device, threads, settings), workload=asdict(workload))
        outputs: dict[str, list[RequestResult]] = {}
        per_round: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        for rnd in range(rounds):
            for b in backends if rnd % 2 == 0 else backends[::-1]:  # alternating order cancels drift
                results, summary = _run_backend(
                    b, path, work, workload, dtype, groups, micro_batches, threads, router_threads,
                    expert_threads, bw, device,
                )  # fmt: skip
                outputs[b] = results
                per_round[b].append(summary)
                print(f"[bench] {b}: {json.dumps(_short(summary))}", file=sys.stderr, flush=True)
        for b in backends:
            report.backends[b] = _median(per_round[b])
        if "inprocess" in outputs:
            for b, res in outputs.items():
                report.backends[b]["same_tokens_as_inprocess"] = match_fraction(res, outputs["inprocess"])
        report.ratios()
        return report


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's summary over rounds: each number the median of its rounds (other fields: the last
    round's), with the rounds' throughputs kept."""
    out = dict(rounds[-1])
    for k, v in rounds[-1].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in rounds)
    if len(rounds) > 1:
        out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in rounds]
    return out


def _run_backend(
    b, path, work, workload, dtype, groups, micro_batches, threads, router_threads, expert_threads, bw, device
) -> tuple[list[RequestResult], dict[str, Any]]:
    """One backend over the workload: its results and summary."""
    print(f"[bench] {b} ...", file=sys.stderr, flush=True)
    if b == "transformers":
        results, extra = run_transformers(path, work, workload, dtype, device)
    else:
        name, _, opts = b.partition("@")  # "grpc@2": two micro-batches; "inprocess@nocache"
        mb = next((o for o in opts.split("+") if o.isdigit()), "")
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
                prefix_caching="nocache" not in opts.split("+"),
            )
    return results, {**summarize(results, extra.pop("wall_s")), **extra}


def _opts(backend: str) -> list[str]:
    return backend.partition("@")[2].split("+")


def describe(
    path: Path, spec: ModelSpec, device: str, threads: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """The report's header: machine, model, the run's settings and the date."""
    return {
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
        **settings,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


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


# ---- MoE scaling ---------------------------------------------------------------------------------------
def scaling(base_preset: str, experts: Sequence[int], workload: Workload, dtype: str, tmp: Path) -> dict:
    """Throughput of the in-process engine at the given expert counts (same top-k, same expert size)."""
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
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="grpc@2 = grpc with 2 micro-batches; inprocess@nocache = prefix caching off (grpc@2+nocache)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the backends N times, order alternating; report medians"
    )
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
            rounds=args.rounds,
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
