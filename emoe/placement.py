"""Placement: which expert group holds which (layer, expert), in which slot. Versioned and serializable.

`groups[g][layer]` is the tuple of global expert ids that group g holds for that layer, in slot order.
An expert may sit in several groups (a replica of a hot expert); routing then picks one of its copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Placement:
    version: int
    num_experts: int
    groups: tuple[dict[int, tuple[int, ...]], ...]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for g in self.groups for layer in g})

    @classmethod
    def contiguous(
        cls, moe_layers: list[int], num_experts: int, num_groups: int, version: int = 0
    ) -> Placement:
        """Experts 0..E-1 cut into `num_groups` contiguous runs whose sizes differ by at most one."""
        if not 1 <= num_groups <= num_experts:
            raise ValueError(
                f"num_groups must be in [1, {num_experts}] (number of experts), got {num_groups}"
            )
        base, extra = divmod(num_experts, num_groups)
        bounds, start = [], 0
        for g in range(num_groups):
            end = start + base + (1 if g < extra else 0)
            bounds.append((start, end))
            start = end
        groups = tuple({layer: tuple(range(s, e)) for layer in moe_layers} for s, e in bounds)
        return cls(version, num_experts, groups)

    def __post_init__(self) -> None:
        for layer in self.layers:
            held = {e for g in self.groups for e in g.get(layer, ())}
            missing = set(range(self.num_experts)) - held
            if missing:
                raise ValueError(
                    f"placement v{self.version}: layer {layer} has no copy of experts {sorted(missing)}"
                )

    @cached_property
    def _copy_tables(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """layer -> (copies [E], group [E, C], slot [E, C]) over every copy of each expert."""
        out = {}
        for layer in self.layers:
            where: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
            for g, held in enumerate(self.groups):
                for slot, e in enumerate(held.get(layer, ())):
                    where[e].append((g, slot))
            c = max(len(w) for w in where)
            group = torch.zeros(self.num_experts, c, dtype=torch.long)
            slot = torch.zeros(self.num_experts, c, dtype=torch.long)
            for e, w in enumerate(where):
                for i in range(c):
                    group[e, i], slot[e, i] = w[i % len(w)]
            out[layer] = (torch.tensor([len(w) for w in where]), group, slot)
        return out

    def route_pairs(self, layer: int, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group [T, k], slot [T, k]) of every (token, k) pair; an expert with several copies gets its
        pairs spread over them round-robin by token index, so each copy takes an equal share."""
        copies, group, slot = (t.to(topk_ids.device) for t in self._copy_tables[layer])
        if group.shape[1] == 1:
            return group[topk_ids, 0], slot[topk_ids, 0]
        t, k = topk_ids.shape
        dev = topk_ids.device
        pos = torch.arange(t, device=dev).unsqueeze(1) + torch.arange(k, device=dev).unsqueeze(0)  # [T, k]
        which = pos % copies[topk_ids]  # [T, k]
        return group[topk_ids, which], slot[topk_ids, which]

    def to_json(self) -> str:
        groups = [{str(layer): list(ids) for layer, ids in g.items()} for g in self.groups]
        return json.dumps({"version": self.version, "num_experts": self.num_experts, "groups": groups})

    @classmethod
    def from_json(cls, text: str) -> Placement:
        raw = json.loads(text)
        groups = tuple({int(layer): tuple(ids) for layer, ids in g.items()} for g in raw["groups"])
        return cls(int(raw["version"]), int(raw["num_experts"]), groups)
