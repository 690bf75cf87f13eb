"""The autoscaling policy as a pure function: bounds, delays, and contention for the GPU budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.autoscale import ExpertGroupPolicy, PolicyParams, budgeted, decide, demand

P = PolicyParams(
    target_tokens_per_s=100, min_replicas=1, max_replicas=4, upscale_delay_s=2, downscale_delay_s=10
)


@pytest.mark.parametrize("load, want", [(0, 1), (50, 1), (100, 1), (101, 2), (350, 4), (10_000, 4), (-5, 1)])
def test_demand_within_bounds(load, want):
    assert demand(load, P) == want


def test_budget_goes_to_the_hottest_groups():
    p = PolicyParams(target_tokens_per_s=100, min_replicas=1, max_replicas=8, gpu_budget=6)
    loads = {0: 900.0, 1: 50.0, 2: 300.0, 3: 10.0}  # wants 8, 1, 3, 1 = 13 > 6
    alloc = budgeted(loads, p)
    assert sum(alloc.values()) == 6
    assert alloc[1] == alloc[3] == 1  # cold groups keep their minimum
    assert alloc[0] > alloc[2] >= 1
    assert budgeted({0: 900.0, 1: 50.0}, PolicyParams(100, 1, 8, gpu_budget=100)) == {0: 8, 1: 1}


def test_budget_smaller_than_the_minimums_keeps_minimums():
    p = PolicyParams(target_tokens_per_s=100, min_replicas=1, max_replicas=8, gpu_budget=1)
    assert budgeted({0: 900.0, 1: 900.0}, p) == {0: 1, 1: 1}


def test_upscale_waits_for_the_delay_then_jumps():
    state: dict = {}
    out, state = decide({0: 350.0}, {0: 1}, now=0.0, state=state, p=P)
    assert out == {0: 1}
    out, state = decide({0: 350.0}, {0: 1}, now=1.9, state=state, p=P)
    assert out == {0: 1}
    out, state = decide({0: 350.0}, {0: 1}, now=2.0, state=state, p=P)
    assert out == {0: 4}


def test_a_dip_resets_the_delay():
    state: dict = {}
    _, state = decide({0: 350.0}, {0: 1}, now=0.0, state=state, p=P)
    _, state = decide({0: 10.0}, {0: 1}, now=1.0, state=state, p=P)  # load gone: wish to go up is reset
    out, state = decide({0: 350.0}, {0: 1}, now=2.5, state=state, p=P)
    assert out == {0: 1}
    out, _ = decide({0: 350.0}, {0: 1}, now=4.5, state=state, p=P)
    assert out == {0: 4}


def test_downscale_after_its_longer_delay():
    state: dict = {}
    out, state = decide({0: 0.0}, {0: 4}, now=0.0, state=state, p=P)
    out, state = decide({0: 0.0}, {0: 4}, now=9.0, state=state, p=P)
    assert out == {0: 4}
    out, state = decide({0: 0.0}, {0: 4}, now=10.0, state=state, p=P)
    assert out == {0: 1}


def test_serve_policy_reads_replica_metrics_and_keeps_state():
    policy = ExpertGroupPolicy(target_tokens_per_s=100, min_replicas=1, max_replicas=4, upscale_delay_s=0)
    metrics = {"routed_tokens_per_s": {"r1": 180.0, "r2": 170.0}, "group_load_0": {"r1": 20.0}}
    ctx = SimpleNamespace(
        deployment_name="ExpertGroup-1",
        aggregated_metrics=metrics,
        target_num_replicas=2,
        policy_state={},
        current_time=100.0,
    )
    n, state = policy(ctx)
    assert n == 4 and "emoe" in state
    with pytest.raises(ValueError, match="min_replicas"):
        ExpertGroupPolicy(min_replicas=5, max_replicas=2)
