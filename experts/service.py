"""The expert-group request handler, transport-free: checks a forward request and runs the ExpertStore.

Both data planes (gRPC and torch.distributed) call `ExpertGroupCore.forward` after decoding; every check
happens here, before any compute, so a malformed request is refused without harming the replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from emoe.load import RateMeter
from experts.store import ExpertStore


class PlacementMismatch(ValueError):
    """The router computed local ids with another placement version than this replica holds."""


@dataclass(frozen=True)
class ForwardLimits:
    max_tokens: int = 1 << 16
    max_top_k: int = 64


class ExpertGroupCore:
    def __init__(
        self,
        store: ExpertStore,
        group: int,
        placement_version: int,
        hidden_size: int,
        device: torch.device,
        limits: ForwardLimits = ForwardLimits(),
    ):
        self.group = group
        self.stores: dict[int, ExpertStore] = {placement_version: store}  # placement version -> experts
        self.hidden_size, self.device, self.limits = hidden_size, device, limits
        self.meter = RateMeter(window_s=5.0)

    def check(self, layer: int, version: int, n: int, k: int, hidden: int) -> None:
        """Header-level checks (before any payload is allocated)."""
        self.check_target(layer, version)
        self.check_sizes(n, k, hidden)

    @property
    def placement_version(self) -> int:
        return max(self.stores)

    @property
    def store(self) -> ExpertStore:
        return self.stores[self.placement_version]

    def add_version(self, version: int, store: ExpertStore) -> None:
        """Serves `version` too (loaded before routers switch to it)."""
        self.stores[version] = store

    def drop_versions_below(self, version: int) -> None:
        for v in [v for v in self.stores if v < version]:
            del self.stores[v]

    def check_target(self, layer: int, version: int) -> None:
        if version not in self.stores:
            raise PlacementMismatch(
                f"placement_version {version} is not served here (serving {sorted(self.stores)})"
            )
        if layer not in self.stores[version].slots:
            raise ValueError(f"layer {layer} is not held by expert group {self.group}")

    def check_sizes(self, n: int, k: int, hidden: int) -> None:
        if hidden != self.hidden_size:
            raise ValueError(f"hidden: size {hidden} does not match the model's {self.hidden_size}")
        if not 0 <= n <= self.limits.max_tokens:
            raise ValueError(f"hidden: {n} tokens exceeds the limit {self.limits.max_tokens}")
        if not 1 <= k <= self.limits.max_top_k:
            raise ValueError(f"local_ids: top-k {k} outside [1, {self.limits.max_top_k}]")

    def forward(
        self,
        layer: int,
        version: int,
        hidden: torch.Tensor,  # [n, H]
        local_ids: torch.Tensor,  # [n, k]
        weights: torch.Tensor,  # [n, k]
    ) -> torch.Tensor:  # [n, H] in hidden's dtype
        if hidden.dim() != 2 or local_ids.dim() != 2 or weights.dim() != 2:
            raise ValueError("hidden, local_ids and weights must be 2-D ([n, H], [n, k], [n, k])")
        n, k = local_ids.shape
        self.check(layer, version, hidden.shape[0], k, hidden.shape[1])
        if hidden.shape[0] != n or weights.shape != local_ids.shape:
            raise ValueError(
                f"shapes disagree: hidden {list(hidden.shape)}, local_ids {list(local_ids.shape)}, "
                f"weights {list(weights.shape)}"
            )
        store = self.stores[version]
        slots = store.num_slots(layer)
        if n and (int(local_ids.min()) < -1 or int(local_ids.max()) >= slots):
            raise ValueError(f"local_ids: ids must be in [-1, {slots}) for layer {layer}")
        if n and not torch.isfinite(weights).all():
            raise ValueError("weights: not all finite")
        t0 = time.perf_counter()
        out = store.forward(
            layer, hidden.to(self.device), local_ids.to(self.device, torch.long), weights.to(self.device)
        )
        self.meter.record(n, time.perf_counter() - t0)
        return out.to(hidden.dtype)
