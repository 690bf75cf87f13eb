"""`emoe`: the command line.

emoe demo-model DIR [--preset demo|bench-small] [--seed N] [--hot-experts 3,7]
emoe generate "text" [--model DIR] [--max-tokens N] [--temperature T] [--seed N] [--groups G]
emoe demo                      # creates the demo model if missing and generates in process
emoe bench [options]           # performance: transformers vs in-process vs cluster (bench/perf.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.config import DEFAULT_MODEL_DIR


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _ensure_demo_model(path: Path) -> Path:
    from emoe.demo import write_demo_model

    if not (path / "config.json").is_file():
        print(f"creating the demo model (random weights) in {path} ...", flush=True)
        write_demo_model(path)
    return path


def cmd_demo_model(args: argparse.Namespace) -> int:
    from emoe.demo import write_demo_model

    out = write_demo_model(
        args.dir, preset=args.preset, seed=args.seed, dtype=args.dtype, hot_experts=args.hot_experts
    )
    print(f"wrote {args.preset} model (random weights, seed {args.seed}) to {out}")
    return 0


def _generate(model: Path, prompts: list[str], args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from router import Engine

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    t0 = time.perf_counter()
    with Engine.from_pretrained(model, dtype=args.dtype, num_groups=args.groups) as engine:
        print(
            f"loaded {engine.spec.family} model from {model} in {time.perf_counter() - t0:.2f}s", flush=True
        )
        ids = [tok.encode(p).ids for p in prompts]
        t0 = time.perf_counter()
        outs = engine.generate(
            ids, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=True
        )
        dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs, strict=True):
        print(f"--- prompt: {p!r}\n{p}{tok.decode(o)}")
    n = sum(len(o) for o in outs)
    print(f"--- {n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s, {len(prompts)} sequences)")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.address:
        return _generate_remote(args)
    model = _ensure_demo_model(DEFAULT_MODEL_DIR) if args.model is None else Path(args.model)
    _generate(model, [args.text], args)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    import grpc

    from emoe.client import InferenceClient

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    with InferenceClient(args.address, token=args.token) as client:
        try:
            finish = ""
            for msg in client.generate(prompt=args.text, **sampling):
                print(msg.text, end="", flush=True)
                finish = msg.finish_reason or finish
            print(f"\n[finish_reason: {finish}]")
        except grpc.RpcError as e:
            print(f"emoe: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cli.status_cmd import status_main

    try:
        return status_main(args.address)
    except OSError as e:
        print(f"emoe: error: cannot read {args.address}: {e}", file=sys.stderr)
        return 1


BENCHES = ("perf", "autoscale", "dataplane", "sampling", "agent")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "autoscale":
        from bench.autoscale import main as bench_main
    elif args.which == "dataplane":
        from bench.dataplane import main as bench_main
    elif args.which == "sampling":
        from bench.sampling import main as bench_main
    elif args.which == "agent":
        from bench.agent import main as bench_main
    else:
        from bench.perf import main as bench_main
    return bench_main(args.rest)


def cmd_serve(args: argparse.Namespace) -> int:
    from cli.serve_cmd import serve_main

    return serve_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    model = _ensure_demo_model(Path(args.model) if args.model else DEFAULT_MODEL_DIR)
    prompts = ["Once upon a time", "The router holds the dense part", "Hello world!"]
    _generate(model, prompts, args)
    return 0


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--groups", type=int, default=2, help="expert groups (in process)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoe", description="elastic-moe: elastic MoE serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-model", help="write the demo checkpoint (random weights) and tokenizer")
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", default="demo", choices=["demo", "bench-small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hot-experts", type=_int_list, default=[], help="expert ids given a large gate bias")
    p.set_defaults(fn=cmd_demo_model)
    p = sub.add_parser("generate", help="generate a completion of TEXT (in process, or from a server)")
    p.add_argument("text")
    _sampling_flags(p)
    p.add_argument("--address", default=None, help="gRPC address of a running server, e.g. 127.0.0.1:50051")
    p.add_argument("--token", default=None, help="API token of that server")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("serve", help="serve the model on a local Ray cluster (gRPC + OpenAI HTTP)")
    p.add_argument(
        "--model", default=None, help="checkpoint directory (default: the demo model, created if missing)"
    )
    p.add_argument("--config", default=None, help="YAML file of AppConfig fields")
    p.add_argument("--groups", type=int, default=None)
    p.add_argument("--transport", default=None, choices=["grpc", "dist", "local"])
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("status", help="the ops state of a running application, as a table")
    p.add_argument("--address", default="http://127.0.0.1:8000", help="HTTP address of the application")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser(
        "bench",
        help="benchmarks: [perf] (the default: throughput, TTFT, TPOT against transformers and the roofline) "
        "| autoscale | dataplane | sampling (logprobs / structured outputs cost) | agent (multi-turn, prefix caching on/off); arguments pass through (emoe bench --help, emoe bench autoscale --help)",
    )
    p.add_argument("which", choices=BENCHES)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("demo", help="create the demo model if missing and generate a few completions")
    _sampling_flags(p)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench" and (len(argv) == 1 or argv[1] not in BENCHES):
        argv.insert(1, "perf")  # `emoe bench [options]` is the performance benchmark
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"emoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
