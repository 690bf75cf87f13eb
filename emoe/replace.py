"""Hot-expert re-placement (in the spirit of DeepSeek's EPLB): replicate the hottest experts, balance groups.

For each MoE layer, from the tokens/s of each expert, in two greedy steps:
  1. copies: every expert gets one copy; the spare slots (groups x slots_per_group - experts) go one at a
     time to the expert with the highest load per copy it has (so a hot expert is split over groups);
  2. assignment: copies, heaviest (load per copy) first, go to the group with the least load so far that
     has a free slot and does not hold that expert yet (longest-processing-time bin packing).
Routing splits an expert's tokens evenly over its copies (`Placement.route_pairs`), which is the load
model step 2 balances.
"""

from __future__ import annotations

from emoe.placement import Placement


def plan_layer(loads: list[float], num_groups: int, slots_per_group: int) -> list[list[int]]:
    """Per group, the expert ids it holds for one layer (in slot order)."""
    num_experts = len(loads)
    if num_groups * slots_per_group < num_experts:
        raise ValueError(f"{num_groups} groups x {slots_per_group} slots cannot hold {num_experts} experts")
    copies = [1] * num_experts
    spare = min(num_groups * slots_per_group - num_experts, num_experts * (num_groups - 1))
    for _ in range(spare):
        candidates = [e for e in range(num_experts) if copies[e] < num_groups]
        best = max(candidates, key=lambda e: (loads[e] / copies[e], -e))
        if loads[best] <= 0:
            break
        copies[best] += 1
    items = sorted(
        ((loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
        key=lambda x: (-x[0], x[1]),
    )
    held: list[list[int]] = [[] for _ in range(num_groups)]
    load = [0.0] * num_groups
    for per_copy, e in items:
        open_groups = [g for g in range(num_groups) if len(held[g]) < slots_per_group and e not in held[g]]
        g = min(open_groups, key=lambda g: (load[g], len(held[g]), g))
        held[g].append(e)
        load[g] += per_copy
    return [sorted(h) for h in held]


def plan(
    expert_loads: dict[int, list[float]], current: Placement, slots_per_group: int | None = None
) -> Placement:
    """A new placement (version + 1) for the layers of `current`, balanced for `expert_loads`."""
    g_count, n = current.num_groups, current.num_experts
    slots = slots_per_group or -(-n // g_count) + 1
    groups: list[dict[int, tuple[int, ...]]] = [{} for _ in range(g_count)]
    for layer in current.layers:
        loads = expert_loads.get(layer) or [0.0] * n
        for g, ids in enumerate(plan_layer(list(loads), g_count, slots)):
            groups[g][layer] = tuple(ids)
    return Placement(current.version + 1, n, tuple(groups))


def predicted_group_loads(placement: Placement, expert_loads: dict[int, list[float]]) -> list[float]:
    out = [0.0] * placement.num_groups
    for layer, row in expert_loads.items():
        holders: dict[int, list[int]] = {}
        for g, held in enumerate(placement.groups):
            for e in held.get(layer, ()):
                holders.setdefault(e, []).append(g)
        for e, load in enumerate(row):
            for g in holders.get(e, []):
                out[g] += load / len(holders[e])
    return out
