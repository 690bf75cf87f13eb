"""The dispatcher interface: how an MoE layer's tokens reach the expert groups and come back.

Protocol of every implementation, per MoE layer:
  1. map each (token, k) to its (group, slot) with the placement of the step;
  2. per group, gather only the rows routed there, with local slot ids (-1 where another group serves it);
  3. call all groups concurrently;
  4. scatter-add each group's [n_g, H] result into the [T, H] output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from emoe.placement import Placement
from emoe.spec import ModelSpec


class Dispatcher(Protocol):
    """What the engines and the model call; built outside the engine and passed in."""

    placement: Placement

    async def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k], topk_weights [T, k] -> the routed experts' sum [T, H]."""
        ...

    def begin_step(self) -> None:
        """Step boundary: the only point where the placement may change (a step runs on one placement)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for operators: transport, placement_version, calls, failovers, tokens per group,
        dispatch latency (a Histogram dict)."""
        ...

    def close(self) -> None:
        """Releases connections (and whatever the dispatcher's builder attached to it)."""
        ...


class EndpointSource(Protocol):
    """What the remote dispatcher needs of the registry: replicas, the active placement, two reports."""

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """(version, replica entries); the version changes whenever the entries do."""
        ...

    def active_placement(self) -> str | None:
        """JSON of the active placement as last seen, or None before there is one."""
        ...

    def report_unreachable(self, replica_id: str) -> None: ...

    def publish_load(self, router_id: str, loads: dict[int, list[float]]) -> None:
        """This router's tokens/s per (layer, expert): {layer: [tokens/s of expert e]}."""
        ...

    def close(self) -> None: ...


class DispatchError(RuntimeError):
    """No replica of a group answered within the bounded wait."""


class TransportError(RuntimeError):
    """A call to one replica failed (connection lost, timeout, server error, stale placement): retried on
    another replica. Errors a retry cannot fix (a request refused as malformed) are ValueError."""


@dataclass(frozen=True)
class DispatchContext:
    """What a dispatcher factory gets: the model, where it lives, and the placement of its experts."""

    path: Path
    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    placement: Placement
    options: dict[str, Any] = field(default_factory=dict)


def split_by_group(
    placement: Placement, layer: int, topk_ids: torch.Tensor
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Steps 1-2: [(group, rows [n_g], local ids [n_g, k] with -1 elsewhere)] for groups that get tokens."""
    groups, slots = placement.route_pairs(layer, topk_ids)  # [T, k] each
    out = []
    for g in range(placement.num_groups):
        mine = groups == g  # [T, k]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [n_g]
        if rows.numel():
            out.append((g, rows, torch.where(mine[rows], slots[rows], -1)))
    return out
