"""`emoe bench autoscale`: a workload concentrated on a few experts, against the served application.

Phases, on a local Ray cluster with logical GPUs:
  1. skewed load (the demo model built with a large gate bias on experts 0-3, which sit in group 0):
     replicas per group sampled every second until the hot group reaches its maximum (time to scale);
  2. imbalance (max / mean tokens sent per group) measured, re-placement triggered by the admin call,
     imbalance measured again once routers run on the new placement;
  3. load stopped: time until the hot group is back at its minimum.
Every request's greedy output is checked against the in-process engine; failures are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

APP = "emoe-bench"
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world!", "Numbers and symbols"]


class LoadDriver:
    """`clients` threads sending greedy requests round-robin over the prompts of `want` (prompt -> expected
    tokens); counts successes, failures and outputs that differ from `want`."""

    def __init__(self, address: str, want: dict[str, list[int]], clients: int, max_tokens: int):
        self.address, self.want, self.max_tokens = address, want, max_tokens
        self.prompts = list(want)
        self.stop = threading.Event()
        self.done = self.failed = self.mismatched = 0
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        from emoe.client import InferenceClient

        with InferenceClient(self.address, timeout_s=120) as client:
            n = 0
            while not self.stop.is_set():
                prompt = self.prompts[(i + n) % len(self.prompts)]
                n += 1
                try:
                    msgs = client.generate(prompt, max_tokens=self.max_tokens, ignore_eos=True)
                    toks = [t for m in msgs for t in m.token_ids]
                except Exception:  # noqa: BLE001 - counted and reported
                    self.failed += 1
                    continue
                self.done += 1
                self.mismatched += toks != self.want[prompt]

    def __enter__(self) -> LoadDriver:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def replicas(serve, groups: int) -> list[int]:
    deps = serve.status().applications[APP].deployments
    return [int(deps[f"ExpertGroup-{g}"].replica_states.get("RUNNING", 0)) for g in range(groups)]


def imbalance(handle, seconds: float, groups: int) -> float:
    a = handle.router_stats.remote().result()["tokens_per_group"]
    time.sleep(seconds)
    b = handle.router_stats.remote().result()["tokens_per_group"]
    sent = [b.get(g, 0) - a.get(g, 0) for g in range(groups)]
    return max(sent) / max(1e-9, sum(sent) / groups)


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from cluster.app import build_app
    from emoe.demo import write_demo_model
    from emoe.tokenizer import Tokenizer
    from router import Engine

    model = write_demo_model(Path(tempfile.mkdtemp()) / "hot", hot_experts=[0, 1, 2, 3])
    tok = Tokenizer(model)
    with Engine.from_pretrained(model) as engine:
        want = {
            p: engine.generate([tok.encode(p)], max_tokens=args.max_tokens, ignore_eos=True)[0]
            for p in PROMPTS
        }
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_gpus=args.gpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    cfg = dict(
        model=str(model),
        groups=args.groups,
        grpc_port=0,
        autoscaling=True,
        min_replicas_per_group=1,
        max_replicas_per_group=args.max_replicas,
        target_tokens_per_s=args.target,
        upscale_delay_s=1.0,
        downscale_delay_s=args.downscale_delay,
        metrics_push_interval_s=0.5,
        admin_token="bench",
    )
    handle = serve.run(build_app(cfg), name=APP, route_prefix="/")
    address = f"127.0.0.1:{handle.addresses.remote().result()['grpc_port']}"
    timeline: list[dict] = []
    out: dict = {"groups": args.groups, "clients": args.clients}
    t0 = time.monotonic()
    try:
        with LoadDriver(address, want, args.clients, args.max_tokens) as load:
            while time.monotonic() - t0 < args.scale_timeout:
                reps = replicas(serve, args.groups)
                timeline.append({"t_s": round(time.monotonic() - t0, 1), "replicas": reps})
                if reps[0] >= args.max_replicas:
                    out["time_to_scale_s"] = timeline[-1]["t_s"]
                    break
                time.sleep(1.0)
            out["imbalance_before"] = imbalance(handle, 4, args.groups)
            handle.admin_replace.remote("bench").result()
            while handle.router_stats.remote().result().get("placement_version") != 1:
                time.sleep(0.5)
            out["imbalance_after"] = imbalance(handle, 4, args.groups)
            load_stopped = time.monotonic()
        while replicas(serve, args.groups)[0] > 1 and time.monotonic() - load_stopped < 120:
            timeline.append(
                {"t_s": round(time.monotonic() - t0, 1), "replicas": replicas(serve, args.groups)}
            )
            time.sleep(1.0)
        out["back_to_min_after_s"] = round(time.monotonic() - load_stopped, 1)
        out.update(requests=load.done, failed=load.failed, mismatched=load.mismatched, timeline=timeline)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="emoe bench autoscale", description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--target", type=float, default=40.0, help="routed tokens/s per replica")
    ap.add_argument("--downscale-delay", type=float, default=6.0)
    ap.add_argument("--gpus", type=int, default=8, help="logical GPUs declared to the local Ray cluster")
    ap.add_argument("--scale-timeout", type=float, default=60.0)
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "timeline"}, indent=2))
    print("replicas per group over time:")
    for row in out["timeline"]:
        print(f"  {row['t_s']:6.1f}s  {row['replicas']}")
    return 0 if out["failed"] == 0 and out["mismatched"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
