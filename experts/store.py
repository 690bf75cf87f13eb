"""ExpertStore: the routed experts of a set of (layer, expert) pairs, stacked per layer."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from emoe.checkpoint import Checkpoint
from emoe.layout import expert_keys
from emoe.spec import ModelSpec
from experts.ffn import PackedExperts, expert_ffn_grouped, expert_ffn_packed, packing_supported


class ExpertStore:
    """Holds, per MoE layer, the stacked weights of the experts in its slots and computes their mixture.

    `slots[layer]` lists the global expert ids held for that layer; a local id is an index into it.
    It knows nothing of attention, gating or where the tokens come from.
    """

    def __init__(
        self,
        slots: Mapping[int, Sequence[int]],
        gate_up: Mapping[int, torch.Tensor],  # layer -> [E_local, 2I, H]
        down: Mapping[int, torch.Tensor],  # layer -> [E_local, H, I]
        *,
        pack: bool = True,
    ):
        self.slots = {layer: tuple(ids) for layer, ids in slots.items()}
        self.gate_up = dict(gate_up)
        self.down = dict(down)
        for layer, ids in self.slots.items():
            assert self.gate_up[layer].shape[0] == len(ids) == self.down[layer].shape[0]
        # CPU bf16 (and `pack`): each layer's weights are re-laid out for oneDNN on its first forward, and
        # the plain copy dropped (kept as a "meta" tensor of the same shape, for nbytes and checks)
        self.pack = pack
        self.packed: dict[int, PackedExperts] = {}
        self._pack_lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        spec: ModelSpec,
        slots: Mapping[int, Sequence[int]],
        dtype: torch.dtype = torch.float32,
    ) -> ExpertStore:
        """Reads only the tensors of the experts named in `slots`."""
        gate_up, down = {}, {}
        for layer, ids in slots.items():
            if not spec.moe_layers[layer]:
                raise ValueError(f"layer {layer} is not an MoE layer")
            gu, dn = [], []
            for e in ids:
                if not 0 <= e < spec.num_experts:
                    raise ValueError(f"expert id {e} out of range [0, {spec.num_experts}) in layer {layer}")
                g, u, d = expert_keys(spec, layer, e)
                gu.append(torch.cat([ckpt.get(g, dtype), ckpt.get(u, dtype)], dim=0))  # [2I, H]
                dn.append(ckpt.get(d, dtype))  # [H, I]
            gate_up[layer] = torch.stack(gu) if gu else _empty(spec, dtype, gate=True)
            down[layer] = torch.stack(dn) if dn else _empty(spec, dtype, gate=False)
        return cls(slots, gate_up, down)

    def to(self, device: torch.device) -> ExpertStore:
        if self.packed:
            raise RuntimeError("ExpertStore.to() after its weights were packed for oneDNN")
        self.gate_up = {layer: t.to(device) for layer, t in self.gate_up.items()}
        self.down = {layer: t.to(device) for layer, t in self.down.items()}
        return self

    def num_slots(self, layer: int) -> int:
        return len(self.slots.get(layer, ()))

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [n, H]
        local_ids: torch.Tensor,  # [n, k], -1 = not held here
        weights: torch.Tensor,  # [n, k]
    ) -> torch.Tensor:  # [n, H]
        if layer not in self.slots:
            raise ValueError(f"this store holds no experts of layer {layer}")
        n = self.num_slots(layer)
        if local_ids.numel() and int(local_ids.max()) >= n:
            raise ValueError(
                f"local expert id {int(local_ids.max())} out of range for layer {layer} ({n} slots)"
            )
        packed = self.packed.get(layer) or self._pack(layer)
        if packed is not None:
            return expert_ffn_packed(x.to(torch.bfloat16).contiguous(), local_ids, weights, packed)
        w_gu, w_d = self.gate_up[layer], self.down[layer]
        return expert_ffn_grouped(x.to(w_gu.dtype), local_ids, weights, w_gu, w_d)

    def _pack(self, layer: int) -> PackedExperts | None:
        w_gu, w_d = self.gate_up[layer], self.down[layer]
        if not self.pack or w_gu.device.type == "meta" or not len(w_gu):
            return self.packed.get(layer)
        if not packing_supported(w_gu.dtype, w_gu.device):
            return None
        with self._pack_lock:
            if layer not in self.packed:
                self.packed[layer] = PackedExperts(w_gu, w_d)
                self.gate_up[layer], self.down[layer] = w_gu.to("meta"), w_d.to("meta")
            return self.packed[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.gate_up.values(), *self.down.values()])


def _empty(spec: ModelSpec, dtype: torch.dtype, *, gate: bool) -> torch.Tensor:
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return torch.empty((0, 2 * i, h) if gate else (0, h, i), dtype=dtype)
