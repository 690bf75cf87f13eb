"""The router's numbers under vLLM's metric names, next to the `emoe_` ones, for the tools that key on them
(aiperf's server-metrics scrape, llm-d, KEDA scalers, vLLM Grafana boards). Names, types and the
`model_name` label follow vLLM's production-metrics documentation (docs/metrics.md lists them)."""

from __future__ import annotations

from typing import Any

from emoe.metrics import Family, Histogram

SCALARS = (  # (vLLM name, type, help, router stats key)
    ("vllm:num_requests_running", "gauge", "Requests in the running batch", "running"),
    ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled", "waiting"),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1)", "kv_usage"),
    ("vllm:prompt_tokens_total", "counter", "Prompt tokens admitted", "prompt_tokens"),
    ("vllm:generation_tokens_total", "counter", "Tokens generated", "tokens_generated"),
    ("vllm:num_preemptions_total", "counter", "Preemptions of running requests", "preemptions"),
    (
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prompt tokens queried in the prefix cache",
        "prefix_cache_queries",
    ),
    (
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prompt tokens that hit the prefix cache",
        "prefix_cache_hits",
    ),
)
HISTOGRAMS = (  # (router stats key, vLLM name, help)
    ("ttft_s", "vllm:time_to_first_token_seconds", "Time to first token"),
    ("tpot_s", "vllm:inter_token_latency_seconds", "Time between successive output tokens"),
    ("e2e_s", "vllm:e2e_request_latency_seconds", "End-to-end request latency"),
)


def vllm_families(router: dict[str, Any]) -> list[Family]:
    """Families from one router's `stats()` (the Frontend's snapshot of its router deployment)."""
    model = {"model_name": router.get("model", "")}
    fams = [Family(name, kind, text).add(router.get(key, 0), **model) for name, kind, text, key in SCALARS]
    success = Family("vllm:request_success_total", "counter", "Finished requests, by finish reason")
    for reason, n in sorted((router.get("finished_by_reason") or {}).items()):
        success.add(n, finished_reason=reason, **model)
    fams.append(success)
    for key, name, help_text in HISTOGRAMS:
        if key in router:
            fams.append(
                Family(name, "histogram", help_text).add_histogram(Histogram.from_dict(router[key]), **model)
            )
    return fams
