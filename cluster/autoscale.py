"""Autoscaling of expert groups by routed tokens/s: a pure policy, and its Ray Serve wiring.

`decide` is the whole policy, a pure function of the load of every group:
  1. raw demand of group g = ceil(tokens_per_s[g] / target_tokens_per_s_per_replica), within [min, max];
  2. under a cluster-wide GPU budget (replicas of all groups together), every group first gets its
     minimum, then the remaining budget goes one replica at a time to the group with the highest load per
     replica it would then have (the hottest groups win);
  3. delays: a group moves up only after its demand stayed above its current count for `upscale_delay_s`,
     and down only after it stayed below for `downscale_delay_s` (then straight to the demand).

Serve wiring: every ExpertGroup-<g> deployment uses `expert_group_policy` (a deployment-level custom
`AutoscalingPolicy`). Each replica's `record_autoscaling_stats` reports its own routed tokens/s and busy
fraction and the registry's view of every group's load (`group_load_<i>`), so each group's policy sees all
groups and computes the same budgeted allocation; it returns its own share. Serve's own delays are set to
0: the delays are applied here, in one place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class PolicyParams:
    target_tokens_per_s: float = 200.0  # per replica
    min_replicas: int = 1
    max_replicas: int = 8
    gpu_budget: int | None = None  # replicas of all expert groups together; None = unlimited
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 20.0

    def __post_init__(self) -> None:
        if self.target_tokens_per_s <= 0:
            raise ValueError("target_tokens_per_s must be > 0")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 0 <= min_replicas <= max_replicas")
        if self.gpu_budget is not None and self.gpu_budget < 0:
            raise ValueError("gpu_budget must be >= 0")


def demand(load: float, p: PolicyParams) -> int:
    return min(p.max_replicas, max(p.min_replicas, math.ceil(max(load, 0.0) / p.target_tokens_per_s)))


def budgeted(loads: Mapping[int, float], p: PolicyParams) -> dict[int, int]:
    """Steps 1-2: the replicas each group should have now, ignoring delays."""
    want = {g: demand(load, p) for g, load in loads.items()}
    if p.gpu_budget is None or sum(want.values()) <= p.gpu_budget:
        return want
    alloc = {g: p.min_replicas for g in loads}
    left = p.gpu_budget - sum(alloc.values())
    while left > 0:
        growable = [g for g in loads if alloc[g] < want[g]]
        if not growable:
            break
        hottest = max(growable, key=lambda g: (loads[g] / (alloc[g] + 1), -g))
        alloc[hottest] += 1
        left -= 1
    return alloc


def decide(
    loads: Mapping[int, float],
    current: Mapping[int, int],
    now: float,
    state: dict[int, dict[str, float]],
    p: PolicyParams,
) -> tuple[dict[int, int], dict[int, dict[str, float]]]:
    """Step 3 on top of `budgeted`: (replicas per group, new state). `state` holds when each group's wish
    to move up or down began; pass back what this returns."""
    target = budgeted(loads, p)
    out, new_state = {}, {}
    for g, cur in current.items():
        want = target.get(g, cur)
        s = dict(state.get(g, {}))
        direction = "up" if want > cur else "down" if want < cur else None
        for d in ("up", "down"):
            if d != direction:
                s.pop(f"{d}_since", None)
        if direction is None:
            out[g] = cur
        else:
            since = s.setdefault(f"{direction}_since", now)
            delay = p.upscale_delay_s if direction == "up" else p.downscale_delay_s
            out[g] = want if now - since >= delay else cur
            if out[g] != cur:
                s.pop(f"{direction}_since", None)
        new_state[g] = s
    return out, new_state


# ---- Serve wiring ------------------------------------------------------------------------------


def group_of(deployment_name: str) -> int:
    return int(deployment_name.rsplit("-", 1)[1])


def loads_from_metrics(metrics: Mapping[str, Mapping[Any, float]], own_group: int) -> dict[int, float]:
    """Every group's tokens/s: the registry's view reported by the replicas, or this group's own sum."""
    loads: dict[int, float] = {}
    for name, per_replica in metrics.items():
        if name.startswith("group_load_") and per_replica:
            loads[int(name.rsplit("_", 1)[1])] = max(per_replica.values())
    own = sum((metrics.get("routed_tokens_per_s") or {}).values())
    loads[own_group] = max(loads.get(own_group, 0.0), own)
    return loads


class ExpertGroupPolicy:
    """Deployment-level Serve policy of one expert group; `policy_kwargs` are PolicyParams fields.

    Serve instantiates it once per deployment and calls it every autoscaling tick with the context.
    """

    def __init__(self, **kwargs: Any):
        self.params = PolicyParams(**kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        p = self.params
        g = group_of(ctx.deployment_name)
        loads = loads_from_metrics(ctx.aggregated_metrics or {}, g)
        current = {h: (ctx.target_num_replicas if h == g else demand(loads[h], p)) for h in loads}
        state = {g: dict((ctx.policy_state or {}).get("emoe", {}))}
        now = ctx.current_time if ctx.current_time is not None else time.time()
        decision, new_state = decide(loads, current, now, state, p)
        pinned = (ctx.aggregated_metrics or {}).get(f"override_{g}")
        if pinned:  # an operator pinned this group's size (dashboard action): no delay, no budget
            decision[g] = int(max(pinned.values()))
        if decision[g] != ctx.target_num_replicas:
            log.info(
                "%s: loads %s -> %d replicas (was %d)",
                ctx.deployment_name,
                loads,
                decision[g],
                ctx.target_num_replicas,
            )
        return decision[g], {**(ctx.policy_state or {}), "emoe": new_state.get(g, {})}
