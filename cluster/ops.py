"""Operations state: one snapshot of the application (router, registry, Serve), its history, its metrics.

The Frontend keeps an `OpsState`: a background task gathers a snapshot every `interval_s` seconds, keeps a
bounded history (replicas current / desired per group over time, throughput, latencies), records
autoscaling and re-placement events, mirrors the numbers into Ray's metrics export, and renders them as
Prometheus text for `/metrics`. The dashboard and `emoe status` read the same snapshot as JSON.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any

from cluster.ops_vllm import vllm_families
from cluster.router_stats import merge
from emoe.metrics import Family, Histogram, render

log = logging.getLogger(__name__)

HISTORY = 600  # samples kept (10 min at 1 s)
MAX_FIELD_LABELS = 32  # distinct unknown-field names counted by name


def serve_replicas(app_name: str) -> dict[str, dict[str, int]]:
    """Per deployment: running replicas and desired (every replica not stopping). Blocking call."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    out = {}
    for name, d in (app.deployments if app else {}).items():
        states = {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
        running = states.get("RUNNING", 0)
        desired = sum(v for k, v in states.items() if k != "STOPPING")
        out[name] = {
            "running": running,
            "desired": desired,
            "status": str(getattr(d.status, "value", d.status)),
        }
    return out


class OpsState:
    def __init__(self, router: Any, registry: Any, app_name: str, num_groups: int, interval_s: float = 1.0):
        self.router, self.registry, self.app_name = router, registry, app_name
        self.num_groups, self.interval_s = num_groups, interval_s
        self.snapshot: dict[str, Any] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.rejected: dict[str, int] = {}
        self.ignored: dict[str, int] = {}  # unknown request field -> requests that sent it
        self._task: asyncio.Task | None = None
        self._ray_metrics: dict[str, Any] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_ignored(self, fields: list[str]) -> None:
        """Unknown request fields, by name; past MAX_FIELD_LABELS distinct names they count as "other"
        (a client cannot grow the label set without bound)."""
        for f in fields:
            key = f[:64] if f[:64] in self.ignored or len(self.ignored) < MAX_FIELD_LABELS else "other"
            self.ignored[key] = self.ignored.get(key, 0) + 1

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - a component restarting: try again next tick
                log.debug("ops refresh failed: %s", e)
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> dict[str, Any]:
        per_router = await self.registry.router_stats.remote() if self.registry else {}
        router = merge(per_router) if per_router else await self.router.stats.remote()
        report = await self.registry.load_report.remote() if self.registry else {}
        placement = await self.registry.placement_state.remote() if self.registry else {}
        _, entries = await self.registry.snapshot.remote() if self.registry else (0, [])
        replacements = await self.registry.replacements_log.remote() if self.registry else []
        serve_state = await asyncio.to_thread(serve_replicas, self.app_name)
        snap = {
            "time": time.time(),
            "router": router,
            "loads": report,
            "placement": placement,
            "replicas": entries,
            "deployments": serve_state,
            "rejected": dict(self.rejected),
            "replacements": replacements,
        }
        self._note_events(snap)
        self.snapshot = snap
        self.history.append(self._point(snap))
        self._export_to_ray(snap)
        return snap

    def _point(self, snap: dict[str, Any]) -> dict[str, Any]:
        r = snap["router"]
        prev = self.history[-1] if self.history else None
        dt = snap["time"] - prev["time"] if prev else 0.0
        tokens = r.get("tokens_generated", 0)
        groups = {}
        for g in range(self.num_groups):
            d = snap["deployments"].get(f"ExpertGroup-{g}", {})
            groups[g] = {"running": d.get("running", 0), "desired": d.get("desired", 0)}
        return {
            "time": snap["time"],
            "tokens": tokens,
            "tokens_per_s": (tokens - prev["tokens"]) / dt if prev and dt > 0 else 0.0,
            "groups": groups,
            "imbalance": snap["loads"].get("imbalance", 0.0),
            "ttft_p50": Histogram.from_dict(r["ttft_s"]).quantile(0.5) if "ttft_s" in r else math.nan,
            "tpot_p50": Histogram.from_dict(r["tpot_s"]).quantile(0.5) if "tpot_s" in r else math.nan,
        }

    def _note_events(self, snap: dict[str, Any]) -> None:
        if not self.history:
            return
        last = self.history[-1]["groups"]
        for g in range(self.num_groups):
            d = snap["deployments"].get(f"ExpertGroup-{g}", {})
            before = last.get(g, {}).get("desired")
            if before is not None and d.get("desired") not in (None, before):
                self.events.append(
                    {
                        "time": snap["time"],
                        "kind": "autoscale",
                        "group": g,
                        "from": before,
                        "to": d["desired"],
                    }
                )
        seen = {e.get("to_version") for e in self.events if e["kind"] == "replacement"}
        for ev in snap["replacements"]:
            if ev["to_version"] not in seen:
                self.events.append({"kind": "replacement", "time": ev["at"], **ev})

    def state(self) -> dict[str, Any]:
        """What the dashboard and `emoe status` show."""
        return {
            "snapshot": self.snapshot,
            "history": list(self.history),
            "events": list(self.events),
            "num_groups": self.num_groups,
        }

    # ---- metrics ---------------------------------------------------------------------------------
    def families(self) -> list[Family]:
        snap = self.snapshot
        if not snap:
            return []
        r, loads = snap["router"], snap["loads"]
        fam = [
            Family("emoe_routed_tokens_total", "counter", "Tokens the router sent to each expert group"),
            Family(
                "emoe_expert_load_tokens_per_second",
                "gauge",
                "Routed tokens/s per (layer, expert), 10 s window",
            ),
            Family("emoe_group_load_tokens_per_second", "gauge", "Routed tokens/s per expert group"),
            Family("emoe_group_replicas", "gauge", "Replicas of each expert group, running"),
            Family(
                "emoe_group_replicas_desired",
                "gauge",
                "Replicas of each expert group, desired by the autoscaler",
            ),
            Family("emoe_placement_version", "gauge", "Active placement version"),
            Family("emoe_load_imbalance", "gauge", "max / mean expert-group load"),
            Family("emoe_dispatch_latency_seconds", "histogram", "One expert-group call, per transport"),
            Family("emoe_ttft_seconds", "histogram", "Time to first token"),
            Family("emoe_tpot_seconds", "histogram", "Time per output token"),
            Family("emoe_request_latency_seconds", "histogram", "End-to-end request latency"),
            Family("emoe_generated_tokens_total", "counter", "Output tokens generated"),
            Family("emoe_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use"),
            Family("emoe_queue_depth", "gauge", "Requests waiting for admission"),
            Family("emoe_running_requests", "gauge", "Requests in the running batch"),
            Family("emoe_failovers_total", "counter", "Expert calls that moved to another replica"),
            Family(
                "emoe_autoscaling_decisions_total", "counter", "Changes of an expert group's desired replicas"
            ),
            Family("emoe_replacements_total", "counter", "Hot-expert re-placements started"),
            Family("emoe_rejected_requests_total", "counter", "Requests refused, by reason"),
            Family("emoe_ignored_request_fields_total", "counter", "Unknown request fields ignored, by name"),
            Family(
                "emoe_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache"
            ),
            Family("emoe_prefix_cache_hits_total", "counter", "Prompt tokens served from cached KV blocks"),
            Family("emoe_prefix_cache_hit_ratio", "gauge", "Prefix-cache hits / queries since start"),
            Family("emoe_prefix_cache_blocks", "gauge", "KV blocks named in the prefix cache"),
            Family("emoe_prefix_cache_evictions_total", "counter", "Cached KV blocks evicted for new ones"),
            Family("emoe_router_prefix_cache_queries_total", "counter", "Prefix-cache queries, per router"),
            Family(
                "emoe_router_prefix_cache_hits_total", "counter", "Prefix-cache hits (tokens), per router"
            ),
            Family("emoe_router_prefix_cache_blocks", "gauge", "KV blocks named in the cache, per router"),
            Family(
                "emoe_router_prefix_cache_evictions_total", "counter", "Cached blocks evicted, per router"
            ),
            Family("emoe_router_running_requests", "gauge", "Requests in the running batch, per router"),
            Family("emoe_router_queue_depth", "gauge", "Requests waiting for admission, per router"),
            Family("emoe_router_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use, per router"),
        ]
        by = {f.name: f for f in fam}
        for g, n in (r.get("tokens_per_group") or {}).items():
            by["emoe_routed_tokens_total"].add(n, group=g)
        for layer, row in (loads.get("expert_loads") or {}).items():
            for e, v in enumerate(row):
                by["emoe_expert_load_tokens_per_second"].add(v, layer=layer, expert=e)
        for g, v in (loads.get("group_loads") or {}).items():
            by["emoe_group_load_tokens_per_second"].add(v, group=g)
        for g in range(self.num_groups):
            d = snap["deployments"].get(f"ExpertGroup-{g}", {})
            by["emoe_group_replicas"].add(d.get("running", 0), group=g)
            by["emoe_group_replicas_desired"].add(d.get("desired", 0), group=g)
        by["emoe_placement_version"].add(r.get("placement_version", 0))
        by["emoe_load_imbalance"].add(loads.get("imbalance", 0.0))
        if "dispatch_latency_s" in r:
            by["emoe_dispatch_latency_seconds"].add_histogram(
                Histogram.from_dict(r["dispatch_latency_s"]), transport=r.get("transport", "")
            )
        for key, name in (
            ("ttft_s", "emoe_ttft_seconds"),
            ("tpot_s", "emoe_tpot_seconds"),
            ("e2e_s", "emoe_request_latency_seconds"),
        ):
            if key in r:
                by[name].add_histogram(Histogram.from_dict(r[key]))
        by["emoe_generated_tokens_total"].add(r.get("tokens_generated", 0))
        by["emoe_kv_cache_usage_ratio"].add(r.get("kv_usage", 0.0))
        by["emoe_queue_depth"].add(r.get("waiting", 0))
        by["emoe_running_requests"].add(r.get("running", 0))
        by["emoe_failovers_total"].add(r.get("failovers", 0))
        by["emoe_prefix_cache_queries_total"].add(r.get("prefix_cache_queries", 0))
        by["emoe_prefix_cache_hits_total"].add(r.get("prefix_cache_hits", 0))
        by["emoe_prefix_cache_hit_ratio"].add(r.get("prefix_cache_hit_rate", 0.0))
        by["emoe_prefix_cache_blocks"].add(r.get("prefix_cache_blocks", 0))
        by["emoe_prefix_cache_evictions_total"].add(r.get("prefix_cache_evictions", 0))
        for rid, one in (r.get("routers") or {}).items():
            for key, name in (
                ("prefix_cache_queries", "emoe_router_prefix_cache_queries_total"),
                ("prefix_cache_hits", "emoe_router_prefix_cache_hits_total"),
                ("prefix_cache_blocks", "emoe_router_prefix_cache_blocks"),
                ("prefix_cache_evictions", "emoe_router_prefix_cache_evictions_total"),
                ("running", "emoe_router_running_requests"),
                ("waiting", "emoe_router_queue_depth"),
                ("kv_usage", "emoe_router_kv_cache_usage_ratio"),
            ):
                if key in one:
                    by[name].add(one[key], router=rid)
        by["emoe_autoscaling_decisions_total"].add(sum(e["kind"] == "autoscale" for e in self.events))
        by["emoe_replacements_total"].add(len(snap.get("replacements", [])))
        for reason, n in snap["rejected"].items():
            by["emoe_rejected_requests_total"].add(n, reason=reason)
        for name, n in sorted(self.ignored.items()):
            by["emoe_ignored_request_fields_total"].add(n, field=name)
        return fam + vllm_families(r)

    def prometheus_text(self) -> str:
        return render(self.families())

    def _export_to_ray(self, snap: dict[str, Any]) -> None:
        """Mirrors gauges and counters into Ray's metrics export (what Prometheus scrapes on a Ray cluster;
        Ray prefixes them with `ray_`). Histograms stay on /metrics only."""
        try:
            from ray.util import metrics as ray_metrics
        except ImportError:  # pragma: no cover - Ray is always there in the Frontend
            return
        for fam in self.families():
            if fam.kind == "histogram" or fam.name.startswith("vllm:"):  # aliases stay on /metrics
                continue
            keys = tuple(sorted({k for s in fam.samples for k, _ in s.labels}))
            gauge = self._ray_metrics.get(fam.name)
            if gauge is None:
                gauge = self._ray_metrics[fam.name] = ray_metrics.Gauge(fam.name, fam.help, tag_keys=keys)
            for s in fam.samples:
                gauge.set(s.value, tags=dict(s.labels))
