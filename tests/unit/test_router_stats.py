"""Several Router replicas' stats, as the Frontend sees them: each router publishes to the Registry, the
Frontend merges them (sums, merged histograms, ratios from the sums) and exports per-router series."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.ops import OpsState
from cluster.registry import Registry
from cluster.router_stats import merge
from emoe.api import GenerateRequest, SamplingParams
from emoe.demo import write_demo_model
from emoe.metrics import render
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig


@pytest.fixture(scope="module")
def two_routers(tmp_path_factory):
    """Two real engines' stats after different work: router a serves one prompt twice (a cache hit)."""
    path = write_demo_model(tmp_path_factory.mktemp("demo") / "m")
    with Engine.from_pretrained(path) as engine:

        async def run(prompts):
            ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, EngineConfig(kv_blocks=64))
            for i, p in enumerate(prompts):
                req = GenerateRequest(f"r{i}", tuple(p), SamplingParams(max_tokens=3, ignore_eos=True))
                async for _ in ae.generate(req):
                    pass
            st = ae.stats()
            await ae.close()
            return st

        long = list(range(5, 45))
        a = asyncio.run(run([long, long]))
        b = asyncio.run(run([[7, 8, 9], [11] * 20, [12] * 6]))
    return {"router-a": a, "router-b": b}


def test_merge_sums_counters_merges_histograms_and_recomputes_ratios(two_routers):
    a, b = two_routers["router-a"], two_routers["router-b"]
    m = merge(two_routers)
    assert m["tokens_generated"] == a["tokens_generated"] + b["tokens_generated"] == 15
    assert m["requests_finished"] == 5 and m["prompt_tokens"] == a["prompt_tokens"] + b["prompt_tokens"]
    assert m["kv_blocks_total"] == a["kv_blocks_total"] + b["kv_blocks_total"]
    assert m["ttft_s"]["count"] == 5 and m["ttft_s"]["sum"] == pytest.approx(
        a["ttft_s"]["sum"] + b["ttft_s"]["sum"]
    )
    assert m["ttft_s"]["counts"] == [
        x + y for x, y in zip(a["ttft_s"]["counts"], b["ttft_s"]["counts"], strict=True)
    ]
    assert a["prefix_cache_hits"] == 32 and b["prefix_cache_hits"] == 0
    assert m["prefix_cache_hits"] == 32
    assert m["prefix_cache_hit_rate"] == pytest.approx(
        32 / (a["prefix_cache_queries"] + b["prefix_cache_queries"])
    )
    assert m["finished_by_reason"] == {"length": 5}
    assert set(m["routers"]) == {"router-a", "router-b"}
    assert m["routers"]["router-a"]["prefix_cache_hit_rate"] == a["prefix_cache_hit_rate"] > 0
    one = merge({"router-a": a})
    assert one["tokens_generated"] == a["tokens_generated"] and set(one["routers"]) == {"router-a"}


def test_metrics_carry_one_series_per_router(two_routers):
    ops = OpsState(None, None, "app", 1)
    ops.snapshot = {
        "router": merge(two_routers),
        "loads": {},
        "deployments": {},
        "rejected": {},
        "replacements": [],
    }
    parsed = {f.name: f for f in text_string_to_metric_families(render(ops.families()))}
    hits = {s.labels["router"]: s.value for s in parsed["emoe_router_prefix_cache_hits"].samples}
    assert hits == {"router-a": 32, "router-b": 0}
    running = {s.labels["router"] for s in parsed["emoe_router_running_requests"].samples}
    assert running == {"router-a", "router-b"}
    (total,) = parsed["emoe_prefix_cache_hits"].samples  # the whole application, unlabelled
    assert total.value == 32


def test_registry_keeps_each_routers_latest_stats_and_drops_a_silent_one():
    async def run():
        r = Registry(load_ttl_s=0.2)
        await r.publish_router_stats("a", {"tokens_generated": 1})
        await r.publish_router_stats("b", {"tokens_generated": 2})
        await r.publish_router_stats("a", {"tokens_generated": 5})
        first = await r.router_stats()
        time.sleep(0.25)
        await r.publish_router_stats("b", {"tokens_generated": 3})
        return first, await r.router_stats()

    first, later = asyncio.run(run())
    assert first == {"a": {"tokens_generated": 5}, "b": {"tokens_generated": 2}}
    assert later == {"b": {"tokens_generated": 3}}  # a stopped publishing: gone after the TTL
