"""The re-placement state machine: the active placement, the pending one replicas are loading, the
imbalance trigger and the log of re-placements. Plain Python, no asyncio or Ray; the caller passes the time.

One re-placement, in steps:
  1. `start` makes a placement (the one given, or one planned from the expert loads) pending as version
     active + 1 and appends an event to `log`;
  2. replicas load their slices of it and register with the placement versions they serve;
  3. `activate_if_ready(entries)` makes it active once every group has a replica serving it (routers
     switch at their next step boundary) and stamps the event with `activated_at`.
The trigger: `should_replace(load_imbalance, now_s)` is True once max/mean group load stayed above `threshold`
for `after_s` seconds with nothing pending.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from emoe.placement import Placement
from emoe.replace import plan, predicted_group_loads


def group_loads(placement: Placement, experts: dict[int, list[float]]) -> dict[int, float]:
    """tokens/s per group: each expert's load split evenly over the groups holding a copy of it."""
    return dict(enumerate(predicted_group_loads(placement, experts)))


def imbalance(loads: dict[int, float]) -> float:
    """max / mean group load (1.0 = balanced; 0 when idle)."""
    if not loads:
        return 0.0
    mean = sum(loads.values()) / len(loads)
    return max(loads.values()) / mean if mean > 0 else 0.0


class ReplacementState:
    """`threshold` None (or 0) never triggers. Times: `start` / `activate_if_ready` stamp the log with the
    `now_s` given (the Registry passes wall time); `should_replace` only measures durations (any clock)."""

    def __init__(self, active: Placement | None, threshold: float | None = None, after_s: float = 10.0):
        self.active = active
        self.pending: Placement | None = None
        self.log: list[dict[str, Any]] = []
        self.threshold, self.after_s = threshold, after_s
        self._imbalanced_since: float | None = None

    def start(
        self,
        expert_loads: dict[int, list[float]],
        imbalance_before: float,
        now_s: float,
        placement: Placement | None = None,
    ) -> dict[str, Any]:
        """Step 1: `placement`, or one planned from `expert_loads`, becomes pending; returns the logged event.
        Raises ValueError without an active placement."""
        if self.active is None:
            raise ValueError("the registry has no placement to replace")
        target = placement if placement is not None else plan(expert_loads, self.active)
        new = Placement(self.active.version + 1, target.num_experts, target.groups)
        predicted = predicted_group_loads(new, expert_loads)
        event = {
            "at": now_s,
            "from_version": self.active.version,
            "to_version": new.version,
            "imbalance_before": imbalance_before,
            "imbalance_predicted": imbalance(dict(enumerate(predicted))),
        }
        self.pending = new
        self.log.append(event)
        return event

    def activate_if_ready(self, entries: Iterable[dict[str, Any]], now_s: float) -> bool:
        """Step 3: the pending placement becomes active once every group has an entry (a registered
        replica: {"group", "placement_versions"}) serving its version; returns whether it did."""
        if self.pending is None:
            return False
        version = self.pending.version
        ready = {e["group"] for e in entries if version in e.get("placement_versions", ())}
        if not ready >= set(range(self.pending.num_groups)):
            return False
        self.active, self.pending = self.pending, None
        self.log[-1]["activated_at"] = now_s
        return True

    def should_replace(self, load_imbalance: float, now_s: float) -> bool:
        """The trigger, checked periodically: True once `load_imbalance` stayed above `threshold` for
        `after_s` (the timer then restarts); a pending re-placement or a balanced check resets it."""
        if self.pending is not None or load_imbalance <= (self.threshold or float("inf")):
            self._imbalanced_since = None
            return False
        if self._imbalanced_since is None:
            self._imbalanced_since = now_s
        if now_s - self._imbalanced_since < self.after_s:
            return False
        self._imbalanced_since = None
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "active": self.active.to_json() if self.active else None,
            "active_version": self.active.version if self.active else None,
            "pending": self.pending.to_json() if self.pending else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """The durable part (JSON-able): placements and the log."""
        return {
            "placement": self.active.to_json() if self.active else None,
            "pending": self.pending.to_json() if self.pending else None,
            "replacements": self.log,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Back to a `to_dict()` state (a stored active placement replaces the one given at start)."""
        if state.get("placement"):
            self.active = Placement.from_json(state["placement"])
        self.pending = Placement.from_json(state["pending"]) if state.get("pending") else None
        self.log = state.get("replacements", [])
