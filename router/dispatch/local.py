"""Expert groups in this process: the reference every remote transport is compared with."""

from __future__ import annotations

from typing import Any

import torch

from emoe.checkpoint import Checkpoint
from emoe.placement import Placement
from experts.store import ExpertStore
from router.dispatch.base import DispatchContext, split_by_group


class LocalDispatcher:
    def __init__(self, stores: list[ExpertStore], placement: Placement):
        if len(stores) != placement.num_groups:
            raise ValueError(f"{len(stores)} expert stores for a placement of {placement.num_groups} groups")
        self.stores, self.placement = stores, placement
        self.calls = 0

    @classmethod
    def from_context(cls, ctx: DispatchContext) -> LocalDispatcher:
        """Reads each group's experts from the checkpoint at `ctx.path`."""
        if ctx.options:
            raise ValueError(f"unknown dispatcher option(s) for 'local': {', '.join(sorted(ctx.options))}")
        ckpt = Checkpoint(ctx.path, ctx.spec)
        try:
            stores = [
                ExpertStore.from_checkpoint(ckpt, ctx.spec, g, ctx.dtype).to(ctx.device)
                for g in ctx.placement.groups
            ]
        finally:
            ckpt.close()
        return cls(stores, ctx.placement)

    async def forward(self, layer, hidden, topk_ids, topk_weights):
        self.calls += 1
        out = torch.zeros_like(hidden)  # [T, H]
        for g, rows, local in split_by_group(self.placement, layer, topk_ids):
            y = self.stores[g].forward(layer, hidden[rows], local, topk_weights[rows])  # [n_g, H]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def begin_step(self) -> None:
        """The placement of in-process groups never changes."""

    def stats(self) -> dict[str, Any]:
        return {"transport": "local", "placement_version": self.placement.version, "calls": self.calls}

    def close(self) -> None:
        self.stores = []
