"""Live re-placement of hot experts: imbalance from >= 2.5 to <= 1.3, no failed request, same outputs."""

from __future__ import annotations

import time

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from tests.waiting import wait_until

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world!", "Numbers and symbols"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    # 4 groups hold experts 0-3 | 4-7 | 8-11 | 12-15; the hot experts 0-3 all sit in group 0
    return write_demo_model(tmp_path_factory.mktemp("hot4") / "m", hot_experts=[0, 1, 2, 3])


def measured_imbalance(handle, seconds: float) -> float:
    """max / mean of the tokens the router actually sent to each group during `seconds`."""
    a = handle.router_stats.remote().result()["tokens_per_group"]
    time.sleep(seconds)
    b = handle.router_stats.remote().result()["tokens_per_group"]
    sent = [b.get(g, 0) - a.get(g, 0) for g in range(4)]
    return max(sent) / (sum(sent) / 4)


def test_replacement_balances_groups_live(launch, hot_model):
    cfg = dict(model=str(hot_model), groups=4, transport="grpc", grpc_port=0, admin_token="adm1n")
    app = launch("emoe-replace", "/replace", cfg, prompts=PROMPTS, max_tokens=MAX_TOKENS)
    handle = app.handle
    with LoadDriver(app.grpc, app.want, clients=4, max_tokens=MAX_TOKENS) as load:
        wait_until(lambda: load.done, 60, "a first request from every load client", until=lambda n: n >= 4)
        before = measured_imbalance(handle, 4)
        assert before >= 2.5, before
        with pytest.raises(Exception, match="admin token"):
            handle.admin_replace.remote("wrong").result()
        event = handle.admin_replace.remote("adm1n").result()
        assert event["to_version"] == 1 and event["imbalance_predicted"] <= 1.3
        wait_until(
            lambda: handle.placement_state.remote().result()["active_version"],
            90,
            "re-placement v1 active",
            until=lambda v: v == 1,
            interval_s=0.5,
        )
        wait_until(
            lambda: handle.router_stats.remote().result()["placement_version"],
            90,
            "the router on placement v1",
            until=lambda v: v == 1,
        )
        after = measured_imbalance(handle, 4)
    assert after <= 1.3, (before, after)
    assert load.failed == 0 and load.mismatched == 0 and load.done > 5
    print(f"imbalance {before:.2f} -> {after:.2f}, {load.done} requests, 0 failed")
