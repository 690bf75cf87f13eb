"""Elastic experts: under load skewed onto one expert group, that group scales 1 -> 3 and back, the cold
group stays at its minimum, and no request fails or changes its greedy output."""

from __future__ import annotations

import time

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.e2e.conftest import free_port

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world!", "Numbers and symbols", "café"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    # experts 0-3 get a large gate bias in every layer: with 2 groups (experts 0-7 | 8-15) all top-4
    # choices land in group 0
    return write_demo_model(tmp_path_factory.mktemp("hot") / "m", hot_experts=[0, 1, 2, 3])


def running_replicas(serve, app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def test_hot_group_scales_up_and_back_without_failures(ray_cluster, hot_model):
    from ray import serve

    from cluster.app import build_app

    tok = Tokenizer(hot_model)
    with Engine.from_pretrained(hot_model) as engine:
        want = {
            p: engine.generate([tok.encode(p)], max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS
        }

    serve.shutdown()  # a fresh Serve instance: HTTP options apply only to a new one
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    cfg = dict(
        model=str(hot_model),
        groups=2,
        transport="grpc",
        grpc_port=0,
        autoscaling=True,
        min_replicas_per_group=1,
        max_replicas_per_group=3,
        target_tokens_per_s=40.0,
        upscale_delay_s=1.0,
        downscale_delay_s=6.0,
        metrics_push_interval_s=0.5,
    )
    handle = serve.run(build_app(cfg), name="emoe-scale", route_prefix="/scale")
    address = f"127.0.0.1:{handle.addresses.remote().result()['grpc_port']}"
    try:
        assert running_replicas(serve, "emoe-scale", "ExpertGroup-0") == 1
        t0 = time.monotonic()
        timeline = []
        scaled_at = None
        with LoadDriver(address, want, clients=6, max_tokens=MAX_TOKENS) as load:
            while time.monotonic() - t0 < 60:
                hot, cold = (running_replicas(serve, "emoe-scale", f"ExpertGroup-{g}") for g in (0, 1))
                timeline.append((round(time.monotonic() - t0, 1), hot, cold))
                assert cold == 1, timeline
                if hot >= 3:
                    scaled_at = time.monotonic() - t0
                    break
                time.sleep(0.5)
            assert scaled_at is not None and scaled_at <= 30, timeline
            time.sleep(3)  # keep serving on the scaled group for a moment
        t1 = time.monotonic()
        while running_replicas(serve, "emoe-scale", "ExpertGroup-0") > 1 and time.monotonic() - t1 < 60:
            time.sleep(0.5)
        back_after = time.monotonic() - t1
        assert running_replicas(serve, "emoe-scale", "ExpertGroup-0") == 1
        assert back_after >= 5.0  # not before the downscale delay
        assert running_replicas(serve, "emoe-scale", "ExpertGroup-1") == 1
        assert load.failed == 0 and load.mismatched == 0 and load.done > 10
        print(
            f"scaled to 3 in {scaled_at:.1f}s, back to 1 {back_after:.1f}s after the load, {load.done} requests"
        )
    finally:
        serve.delete("emoe-scale")
