"""Stats of every Router replica, merged: what the Frontend's metrics, dashboard and `emoe status` show.

Each Router replica publishes its engine's and dispatcher's stats to the Registry every second (a handle
call reaches only one replica, so with routers > 1 it cannot see them all); `merge` sums them into the one
view the single-router stats had (counters and gauges summed, histograms merged bucket by bucket, ratios
recomputed from the sums) and keeps a short per-router summary under "routers" for per-router series.
"""

from __future__ import annotations

from typing import Any

# per-router fields kept under "routers" (what an operator compares between routers)
PER_ROUTER = (
    "pid",
    "running",
    "waiting",
    "kv_usage",
    "tokens_generated",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prefix_cache_hit_rate",
    "prefix_cache_blocks",
    "prefix_cache_evictions",
    "failovers",
)
LARGEST = {"placement_version", "peak_rss_mb"}  # not summed: the largest of them


def _histogram(parts: list[dict]) -> dict:
    out = {"buckets": list(parts[0]["buckets"]), "counts": [0] * len(parts[0]["counts"]), "sum": 0.0}
    out["count"] = 0
    for p in parts:
        if list(p["buckets"]) != out["buckets"]:
            continue  # a replica of another build: not mergeable bucket by bucket
        out["counts"] = [a + b for a, b in zip(out["counts"], p["counts"], strict=True)]
        out["sum"] += p["sum"]
        out["count"] += p["count"]
    return out


def merge(per_router: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One stats dict over all routers (`per_router`: router id -> that router's `stats()`)."""
    parts = list(per_router.values())
    if len(parts) == 1:
        out = dict(parts[0])
    else:
        out = {}
        for key in {k for p in parts for k in p}:
            values = [p[key] for p in parts if key in p]
            first = values[0]
            if isinstance(first, dict) and "buckets" in first:
                out[key] = _histogram(values)
            elif isinstance(first, dict):  # e.g. tokens_per_group, finished_by_reason: summed per key
                acc: dict = {}
                for v in values:
                    for k, n in v.items():
                        acc[k] = acc.get(k, 0) + n
                out[key] = acc
            elif isinstance(first, bool) or not isinstance(first, (int, float)):
                out[key] = first  # names (model, transport)
            elif key in LARGEST:
                out[key] = max(values)
            else:
                out[key] = sum(values)
        total = out.get("kv_blocks_total", 0)
        out["kv_usage"] = out.get("kv_blocks_used", 0) / total if total else 0.0
        queries = out.get("prefix_cache_queries", 0)
        out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits", 0) / queries if queries else 0.0
    out["routers"] = {rid: {k: s[k] for k in PER_ROUTER if k in s} for rid, s in sorted(per_router.items())}
    return out
