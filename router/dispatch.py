"""Dispatchers: how an MoE layer's tokens reach the expert groups and come back.

Interface: `async forward(layer, hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H]`.
Protocol of every implementation:
  1. map each (token, k) to its (group, slot) with the placement of the step;
  2. per group, gather only the rows routed there, with local slot ids (-1 where another group serves it);
  3. call all groups concurrently;
  4. scatter-add each group's [n_g, H] result into the [T, H] output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from emoe.checkpoint import Checkpoint
from emoe.placement import Placement
from emoe.spec import ModelSpec
from experts.store import ExpertStore


class Dispatcher(Protocol):
    placement: Placement

    async def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DispatchContext:
    """What a dispatcher factory gets: the model, where it lives, and the placement of its experts."""

    path: Path
    spec: ModelSpec
    dtype: torch.dtype
    device: torch.device
    placement: Placement
    checkpoint: Checkpoint  # open for the duration of the factory call
    options: dict[str, Any]


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


class LocalDispatcher:
    """Expert groups in this process: the reference every remote transport is compared with."""

    def __init__(self, stores: list[ExpertStore], placement: Placement):
        if len(stores) != placement.num_groups:
            raise ValueError(f"{len(stores)} expert stores for a placement of {placement.num_groups} groups")
        self.stores, self.placement = stores, placement

    async def forward(self, layer, hidden, topk_ids, topk_weights):
        out = torch.zeros_like(hidden)  # [T, H]
        for g, rows, local in split_by_group(self.placement, layer, topk_ids):
            y = self.stores[g].forward(layer, hidden[rows], local, topk_weights[rows])  # [n_g, H]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def close(self) -> None:
        self.stores = []


def _local(ctx: DispatchContext) -> Dispatcher:
    stores = [
        ExpertStore.from_checkpoint(ctx.checkpoint, ctx.spec, g, ctx.dtype).to(ctx.device)
        for g in ctx.placement.groups
    ]
    return LocalDispatcher(stores, ctx.placement)


def _remote(transport: str) -> Callable[[DispatchContext], Dispatcher]:
    def factory(ctx: DispatchContext) -> Dispatcher:
        # Remote groups are Ray actors, started by the cluster layer; the router only knows this entry point.
        from cluster.launch import attach_expert_groups, launch_expert_groups

        if "registry" in ctx.options:
            return attach_expert_groups(ctx, transport)
        return launch_expert_groups(ctx, transport)

    return factory


DISPATCHERS: dict[str, Callable[[DispatchContext], Dispatcher]] = {
    "local": _local,
    "grpc": _remote("grpc"),
    "dist": _remote("dist"),
}


def get_dispatcher(name: str) -> Callable[[DispatchContext], Dispatcher]:
    try:
        return DISPATCHERS[name]
    except KeyError:
        raise ValueError(f"unknown dispatcher {name!r}; choices: {', '.join(sorted(DISPATCHERS))}") from None
