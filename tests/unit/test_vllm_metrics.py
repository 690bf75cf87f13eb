"""The router's numbers under the `vllm:` names aiperf, llm-d, KEDA and vLLM dashboards read (issue 15,
point 7): from a real AsyncEngine run, rendered in the Prometheus text format and parsed back."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from cluster.ops_vllm import vllm_families
from emoe.api import GenerateRequest, SamplingParams
from emoe.demo import write_demo_model
from emoe.metrics import render
from router.dispatch import DispatchContext, LocalDispatcher
from router.engine import AsyncEngine, EngineConfig
from router.model import load_router_model, parse_dtype

VLLM_NAMES = {  # as vLLM documents them (family names: counters without the _total the samples carry)
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
}


def run_requests(tmp_path) -> dict:
    from emoe.placement import Placement

    path = write_demo_model(tmp_path / "demo")
    dtype = parse_dtype("float32")
    spec, model = load_router_model(path, dtype)
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, 1)
    dispatcher = LocalDispatcher.from_context(DispatchContext(path, spec, dtype, model.device, placement))
    engine = AsyncEngine(spec, model, dispatcher, EngineConfig(kv_blocks=64))

    async def go():
        async def one(i, prompt, n):
            req = GenerateRequest(f"r{i}", tuple(prompt), SamplingParams(max_tokens=n, ignore_eos=True))
            async for _ in engine.generate(req):
                pass

        await asyncio.gather(one(0, [5, 6, 7], 4), one(1, [9] * 10, 6))
        await engine.close()

    asyncio.run(go())
    return {**engine.stats(), "model": "demo"}


def test_vllm_names_types_labels_and_values(tmp_path):
    stats = run_requests(tmp_path)
    parsed = {f.name: f for f in text_string_to_metric_families(render(vllm_families(stats)))}
    assert {n: parsed[n].type for n in VLLM_NAMES} == VLLM_NAMES

    def value(name, **labels):
        [s] = [
            s
            for s in parsed[name].samples
            if s.name in (name, name + "_total") and labels.items() <= s.labels.items()
        ]
        assert s.labels["model_name"] == "demo"
        return s.value

    assert value("vllm:prompt_tokens") == 3 + 10
    assert value("vllm:generation_tokens") == 4 + 6
    assert value("vllm:request_success", finished_reason="length") == 2
    assert value("vllm:num_requests_running") == 0 and value("vllm:num_requests_waiting") == 0
    ttft = [s for s in parsed["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value == 2
