"""Elastic experts: under load skewed onto one expert group, that group scales 1 -> 3 and back, the cold
group stays at its minimum, and no request fails or changes its greedy output."""

from __future__ import annotations

import time

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from tests.waiting import wait_until

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


def test_hot_group_scales_up_and_back_without_failures(launch, hot_model):
    from ray import serve

    cfg = dict(
        model=str(hot_model),
        groups=2,
        transport="grpc",
        grpc_port=0,
        autoscaling=True,
        min_replicas_per_group=1,
        max_replicas_per_group=3,
        target_tokens_per_s=15.0,  # the hot group reaches 3 replicas at > 30 tokens/s, even on a slow CI machine
        upscale_delay_s=1.0,
        downscale_delay_s=6.0,
        metrics_push_interval_s=0.5,
    )
    app = launch("emoe-scale", "/scale", cfg, prompts=PROMPTS, max_tokens=MAX_TOKENS)
    timeline: list[tuple[float, int, int]] = []  # (seconds since the load began, hot, cold replicas)

    def observe() -> list[tuple[float, int, int]]:
        hot, cold = (running_replicas(serve, app.name, f"ExpertGroup-{g}") for g in (0, 1))
        timeline.append((round(time.monotonic() - t0, 1), hot, cold))
        assert cold == 1, timeline  # the cold group stays at its minimum throughout
        return timeline

    assert running_replicas(serve, app.name, "ExpertGroup-0") == 1
    t0 = time.monotonic()
    with LoadDriver(app.grpc, app.want, clients=6, max_tokens=MAX_TOKENS) as load:
        scaled = wait_until(
            observe, 90, "the hot group at 3 replicas", until=lambda tl: tl[-1][1] >= 3, interval_s=0.5
        )  # bounded by replica start-up on the machine (about 25 s on 2 cores); not a timed assertion
        scaled_at = scaled[-1][0]
        done_at_scale = load.done  # keep serving on the scaled group for a while
        wait_until(
            lambda: load.done,
            60,
            "10 more requests served by the scaled group",
            until=lambda n: n >= done_at_scale + 10,
        )
    t1 = time.monotonic()
    wait_until(
        lambda: running_replicas(serve, app.name, "ExpertGroup-0"),
        60,
        "the hot group back to 1 replica after the load",
        until=lambda n: n <= 1,
        interval_s=0.5,
    )
    back_after = time.monotonic() - t1
    assert running_replicas(serve, app.name, "ExpertGroup-0") == 1
    assert back_after >= 5.0  # not before the downscale delay
    assert running_replicas(serve, app.name, "ExpertGroup-1") == 1
    assert load.failed == 0 and load.mismatched == 0 and load.done > 10
    print(
        f"scaled to 3 in {scaled_at:.1f}s, back to 1 {back_after:.1f}s after the load, {load.done} requests"
    )
