"""`emoe serve`: start (or join) Ray, deploy the application, report progress, serve until a signal.

Steps: 1. resolve the config (YAML + flags), creating the demo model if it is the default and missing;
2. start a local Ray cluster (127.0.0.1, no dashboard) unless --address is given; 3. start Serve's HTTP
proxy on the configured host and port; 4. deploy `build_app`, printing deployment states while weights
load; 5. print the addresses and `ready`; 6. on SIGINT / SIGTERM: shut Serve and Ray down and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from cluster.config import DEFAULT_MODEL_DIR, AppConfig, ConfigError, load_config


def serve_main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(
            args.config,
            model=args.model,
            groups=args.groups,
            transport=args.transport,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
        )
    except ConfigError as e:
        print(f"emoe: error: {e}", file=sys.stderr)
        return 2
    if Path(cfg.model) == DEFAULT_MODEL_DIR and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        from emoe.demo import write_demo_model

        print(f"creating the demo model (random weights) in {DEFAULT_MODEL_DIR} ...", flush=True)
        write_demo_model(DEFAULT_MODEL_DIR)

    stop = threading.Event()
    import ray
    from ray import serve

    from cluster.app import APP_NAME, build_app

    started_ray = not ray.is_initialized() and args.address is None
    cfg = one_machine_threads(cfg) if started_ray else cfg
    # "local": always a new cluster of our own, never one that happens to run on this machine
    ray.init(address=args.address or "local", include_dashboard=False, namespace="emoe", log_to_driver=False)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.http_port})
        print(f"deploying {cfg.served_name}: {cfg.groups} expert groups over {cfg.transport} ...", flush=True)
        _deploy_with_progress(serve, build_app(cfg.to_args()), APP_NAME, stop)
        if stop.is_set():
            return 0
        grpc_port = serve.get_app_handle(APP_NAME).addresses.remote().result()["grpc_port"]
        print(f"gRPC:      {cfg.host}:{grpc_port}  (emoe.v1.Inference, health, reflection)")
        print(f"HTTP:      http://{cfg.host}:{cfg.http_port}/v1  (OpenAI-compatible)")
        print(f"dashboard: http://{cfg.host}:{cfg.http_port}/dashboard")
        print("ready", flush=True)
        stop.wait()
        print("shutting down ...", flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()


def one_machine_threads(cfg: AppConfig) -> AppConfig:
    """On a local cluster the router and the expert replicas share this machine's cores: unless the
    config says otherwise, the router runs 1 torch thread (its idle OpenMP threads would otherwise spin
    on the cores the expert processes need; docs/benchmarks.md measured 165 -> 123 ms per decode step)."""
    if cfg.transport == "local" or cfg.router_torch_threads:
        return cfg
    return cfg.model_copy(update={"router_torch_threads": 1})


def _deploy_with_progress(serve, app, name: str, stop: threading.Event) -> None:
    done = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            error.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="emoe-deploy", daemon=True).start()
    last = ""
    while not done.wait(1.0) and not stop.is_set():
        line = _progress_line(serve, name)
        if line and line != last:
            print(f"  {time.strftime('%H:%M:%S')} {line}", flush=True)
            last = line
    if error:
        raise error[0]


def _progress_line(serve, name: str) -> str:
    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - the controller is still starting
        return ""
    if app is None:
        return "starting Serve ..."
    parts = [f"{d}: {s.status.value.lower()}" for d, s in sorted(app.deployments.items())]
    return ", ".join(parts)
