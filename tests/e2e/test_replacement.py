"""Live re-placement of hot experts: imbalance from >= 2.5 to <= 1.3, no failed request, same outputs."""

from __future__ import annotations

import time

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.e2e.conftest import free_port

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


def test_replacement_balances_groups_live(ray_cluster, hot_model):
    from ray import serve

    from cluster.app import build_app

    tok = Tokenizer(hot_model)
    with Engine.from_pretrained(hot_model) as engine:
        want = {
            p: engine.generate([tok.encode(p)], max_tokens=MAX_TOKENS, ignore_eos=True)[0] for p in PROMPTS
        }
    serve.shutdown()  # a fresh Serve instance: HTTP options apply only to a new one
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    cfg = dict(model=str(hot_model), groups=4, transport="grpc", grpc_port=0, admin_token="adm1n")
    handle = serve.run(build_app(cfg), name="emoe-replace", route_prefix="/replace")
    address = f"127.0.0.1:{handle.addresses.remote().result()['grpc_port']}"
    try:
        with LoadDriver(address, want, clients=4, max_tokens=MAX_TOKENS) as load:
            time.sleep(3)
            before = measured_imbalance(handle, 4)
            assert before >= 2.5, before
            with pytest.raises(Exception, match="admin token"):
                handle.admin_replace.remote("wrong").result()
            event = handle.admin_replace.remote("adm1n").result()
            assert event["to_version"] == 1 and event["imbalance_predicted"] <= 1.3
            deadline = time.monotonic() + 90
            while handle.placement_state.remote().result()["active_version"] != 1:
                assert time.monotonic() < deadline, "re-placement did not activate"
                time.sleep(0.5)
            while handle.router_stats.remote().result()["placement_version"] != 1:
                assert time.monotonic() < deadline, "router did not switch"
                time.sleep(0.2)
            after = measured_imbalance(handle, 4)
        assert after <= 1.3, (before, after)
        assert load.failed == 0 and load.mismatched == 0 and load.done > 5
        print(f"imbalance {before:.2f} -> {after:.2f}, {load.done} requests, 0 failed")
    finally:
        serve.delete("emoe-replace")
