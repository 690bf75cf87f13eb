"""Soak (a script, not a CI test): mixed load with periodic replica kills for `--duration` seconds.

    python -m bench.soak [--duration 600] [--kill-every 20] [--json FILE]

Starts a local Ray cluster (logical GPUs) and the application (2 expert groups x 2 replicas, 2 routers),
drives greedy and seeded-sampled requests of mixed lengths from several clients, kills an expert replica
every `--kill-every` seconds (alternating `ray.kill` and SIGKILL) and a router every 4th time, and reports
throughput, failed requests (must be 0) and the resident memory of every expert and router process at
the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

APP = "emoe-soak"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from cluster.app import build_app
    from emoe.client import InferenceClient
    from emoe.demo import write_demo_model

    model = write_demo_model(Path(tempfile.mkdtemp()) / "demo")
    ray.init(address="local", num_gpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = dict(model=str(model), groups=2, replicas_per_group=2, routers=2, grpc_port=0)
    handle = serve.run(build_app(cfg), name=APP, route_prefix="/")
    address = f"127.0.0.1:{handle.addresses.remote().result()['grpc_port']}"
    stop, counts = threading.Event(), {"ok": 0, "failed": 0, "tokens": 0}
    errors: list[str] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        with InferenceClient(address, timeout_s=300) as c:
            while not stop.is_set():
                sampling = {"temperature": 0.8, "seed": rng.randrange(1 << 30)} if rng.random() < 0.5 else {}
                try:
                    reply = c.complete(
                        "soak " * rng.randint(1, 40), max_tokens=rng.randint(8, 96), **sampling
                    )
                    counts["ok"] += 1
                    counts["tokens"] += len(reply.token_ids)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    counts["failed"] += 1
                    errors.append(repr(e)[:200])

    def processes() -> dict[str, int]:
        snap = handle.ops_state.remote().result()["snapshot"]
        procs = {f"expert-{r['group']}-{r['replica_id']}": r["pid"] for r in snap.get("replicas", [])}
        procs["router"] = snap.get("router", {}).get("pid", 0)
        return {k: v for k, v in procs.items() if v}

    time.sleep(3)
    start_mem = {k: rss_mb(p) for k, p in processes().items()}
    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    kills = []
    while time.monotonic() - t0 < args.duration:
        time.sleep(args.kill_every)
        n = len(kills)
        target = "Router" if n % 4 == 3 else f"ExpertGroup-{n % 2}"
        names = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#{target}#" in a["name"]
        ]
        if not names:
            continue
        actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
        if n % 2 == 1 and target != "Router":
            pids = [
                r["pid"]
                for r in handle.ops_state.remote().result()["snapshot"]["replicas"]
                if r["group"] == n % 2
            ]
            for pid in pids:
                if rss_mb(pid) is not None:
                    os.kill(pid, signal.SIGKILL)
                    break
            kills.append(("SIGKILL", target, round(time.monotonic() - t0, 1)))
        else:
            ray.kill(actor, no_restart=True)
            kills.append(("ray.kill", target, round(time.monotonic() - t0, 1)))
    stop.set()
    for w in workers:
        w.join(timeout=300)
    elapsed = time.monotonic() - t0
    end_mem = {k: rss_mb(p) for k, p in processes().items()}
    out = {
        "duration_s": round(elapsed, 1),
        "requests_ok": counts["ok"],
        "requests_failed": counts["failed"],
        "output_tokens_per_s": round(counts["tokens"] / elapsed, 1),
        "kills": kills,
        "rss_mb_start": start_mem,
        "rss_mb_end": end_mem,
        "errors": errors[:5],
    }
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
