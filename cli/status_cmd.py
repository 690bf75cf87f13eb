"""`emoe status [--address URL]`: the dashboard's state as a table in the terminal."""

from __future__ import annotations

import json
import urllib.request

from emoe.metrics import Histogram


def _ms(h: dict | None, q: float) -> str:
    if not h or not h.get("count"):
        return "-"
    v = Histogram.from_dict(h).quantile(q)
    return "> 30 s" if v == float("inf") else f"{v * 1000:.0f} ms"


def render(state: dict) -> str:
    snap = state.get("snapshot") or {}
    if not snap:
        return "no data yet (the application is starting)"
    router, loads = snap.get("router", {}), snap.get("loads", {})
    hist = state.get("history") or [{}]
    lines = [
        f"placement v{(snap.get('placement') or {}).get('active_version', 0)}   "
        f"imbalance {loads.get('imbalance', 0):.2f}   tokens/s {hist[-1].get('tokens_per_s', 0):.1f}   "
        f"running {router.get('running', 0)}  waiting {router.get('waiting', 0)}  "
        f"KV {100 * router.get('kv_usage', 0):.0f}%",
        "",
        f"{'deployment':<16}{'running':>8}{'desired':>8}{'load tok/s':>12}  status",
    ]
    group_loads = loads.get("group_loads") or {}
    for name, d in sorted((snap.get("deployments") or {}).items()):
        load = group_loads.get(name.rsplit("-", 1)[1], "") if name.startswith("ExpertGroup-") else ""
        load_s = f"{load:.1f}" if isinstance(load, float) else ""
        lines.append(f"{name:<16}{d['running']:>8}{d['desired']:>8}{load_s:>12}  {d['status']}")
    lines += ["", f"{'group':<6}{'replica':<14}{'node':<10}{'gpu':<6}{'placement':<10}"]
    for r in sorted(snap.get("replicas") or [], key=lambda r: r["group"]):
        gpu = ",".join(r.get("gpu_ids") or []) or "-"
        versions = ",".join(f"v{v}" for v in r.get("placement_versions") or [])
        lines.append(f"{r['group']:<6}{r['replica_id']:<14}{r['node_id'][:8]:<10}{gpu:<6}{versions:<10}")
    lines += [
        "",
        f"TTFT p50/p99 {_ms(router.get('ttft_s'), 0.5)} / {_ms(router.get('ttft_s'), 0.99)}   "
        f"TPOT p50/p99 {_ms(router.get('tpot_s'), 0.5)} / {_ms(router.get('tpot_s'), 0.99)}   "
        f"failovers {router.get('failovers', 0)}",
    ]
    routers = router.get("routers") or {}
    if len(routers) > 1:
        lines += ["", f"{'router':<34}{'running':>8}{'waiting':>8}{'KV':>6}{'cache hits':>12}"]
        for rid, r in routers.items():
            lines.append(
                f"{rid[:33]:<34}{r.get('running', 0):>8}{r.get('waiting', 0):>8}"
                f"{100 * r.get('kv_usage', 0):>5.0f}%{100 * r.get('prefix_cache_hit_rate', 0):>11.0f}%"
            )
    events = state.get("events") or []
    for e in events[-5:]:
        if e["kind"] == "autoscale":
            lines.append(f"event: autoscale group {e['group']} {e['from']} -> {e['to']}")
        else:
            lines.append(f"event: re-placement v{e['from_version']} -> v{e['to_version']}")
    return "\n".join(lines)


def status_main(address: str) -> int:
    url = address.rstrip("/") + "/dashboard/api/state"
    with urllib.request.urlopen(url, timeout=30) as r:
        state = json.loads(r.read())
    print(render(state))
    return 0
