"""ExpertStore: the routed experts of a set of (layer, expert) pairs, stacked per layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import torch

from emoe.checkpoint import Checkpoint
from emoe.layout import expert_keys, fused_expert_keys
from emoe.spec import EXPERTS_FUSED, EXPERTS_PER_EXPERT, SILU_GLU, ExpertActivation, ModelSpec
from experts.ffn import (
    PackedExperts,
    expert_ffn_grouped,
    expert_ffn_packed,
    get_activation,
    packing_supported,
)

Tensors = Mapping[int, torch.Tensor]  # layer -> stacked tensor of that layer's slots


class ExpertStore:
    """Holds, per MoE layer, the stacked weights of the experts in its slots and computes their mixture.

    `slots[layer]` lists the global expert ids held for that layer; a local id is an index into it.
    Per family: optional biases (gate_up_bias [E_local, 2I], down_bias [E_local, H]) and the gated
    activation (`ExpertActivation`, turned into its function once here). It knows nothing of attention,
    gating or where the tokens come from.
    """

    def __init__(
        self,
        slots: Mapping[int, Sequence[int]],
        gate_up: Tensors,  # layer -> [E_local, 2I, H]
        down: Tensors,  # layer -> [E_local, H, I]
        *,
        gate_up_bias: Tensors | None = None,  # layer -> [E_local, 2I]
        down_bias: Tensors | None = None,  # layer -> [E_local, H]
        activation: ExpertActivation = SILU_GLU,
        pack: bool = True,
    ):
        self.slots = {layer: tuple(ids) for layer, ids in slots.items()}
        self.gate_up = dict(gate_up)
        self.down = dict(down)
        self.gate_up_bias = dict(gate_up_bias or {})
        self.down_bias = dict(down_bias or {})
        self.activation = activation
        self.act = get_activation(activation)
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
        """Reads only the tensors (of a fused layout: only the rows) of the experts named in `slots`."""
        read = READERS[spec.expert_layout]
        parts: list[dict[int, torch.Tensor]] = [{}, {}, {}, {}]  # gate_up, down, gate_up_bias, down_bias
        for layer, ids in slots.items():
            if not spec.moe_layers[layer]:
                raise ValueError(f"layer {layer} is not an MoE layer")
            bad = [e for e in ids if not 0 <= e < spec.num_experts]
            if bad:
                raise ValueError(f"expert id {bad[0]} out of range [0, {spec.num_experts}) in layer {layer}")
            tensors = read(ckpt, spec, layer, list(ids), dtype) if ids else _empty(spec, dtype)
            for part, t in zip(parts, tensors, strict=True):
                if t is not None:
                    part[layer] = t
        gate_up, down, gate_up_bias, down_bias = parts
        return cls(
            slots,
            gate_up,
            down,
            gate_up_bias=gate_up_bias,
            down_bias=down_bias,
            activation=spec.expert_activation,
        )

    def to(self, device: torch.device) -> ExpertStore:
        if self.packed:
            raise RuntimeError("ExpertStore.to() after its weights were packed for oneDNN")
        for tensors in (self.gate_up, self.down, self.gate_up_bias, self.down_bias):
            tensors.update({layer: t.to(device) for layer, t in tensors.items()})
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
            return expert_ffn_packed(x.to(torch.bfloat16).contiguous(), local_ids, weights, packed, self.act)
        w_gu, w_d = self.gate_up[layer], self.down[layer]
        return expert_ffn_grouped(
            x.to(w_gu.dtype),
            local_ids,
            weights,
            w_gu,
            w_d,
            b_gate_up=self.gate_up_bias.get(layer),
            b_down=self.down_bias.get(layer),
            act=self.act,
        )

    def _pack(self, layer: int) -> PackedExperts | None:
        w_gu, w_d = self.gate_up[layer], self.down[layer]
        if not self.pack or w_gu.device.type == "meta" or not len(w_gu):
            return self.packed.get(layer)
        if not packing_supported(w_gu.dtype, w_gu.device):
            return None
        with self._pack_lock:
            if layer not in self.packed:
                biases = self.gate_up_bias.get(layer), self.down_bias.get(layer)
                self.packed[layer] = PackedExperts(w_gu, w_d, *biases)
                self.gate_up[layer], self.down[layer] = w_gu.to("meta"), w_d.to("meta")
            return self.packed[layer]

    def nbytes(self) -> int:
        tensors = (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        return sum(t.numel() * t.element_size() for ts in tensors for t in ts.values())


Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _read_per_expert(ckpt: Checkpoint, spec: ModelSpec, layer: int, ids: list[int], dtype) -> Parts:
    """One (gate, up, down) triple per expert: gate_up [e, 2I, H], down [e, H, I]; no biases."""
    gu, dn = [], []
    for e in ids:
        g, u, d = expert_keys(spec, layer, e)
        gu.append(torch.cat([ckpt.get(g, dtype), ckpt.get(u, dtype)], dim=0))  # [2I, H]
        dn.append(ckpt.get(d, dtype))  # [H, I]
    return torch.stack(gu), torch.stack(dn), None, None


def _read_fused(ckpt: Checkpoint, spec: ModelSpec, layer: int, ids: list[int], dtype) -> Parts:
    """gpt-oss: each of the layer's four tensors read once, only the rows of `ids` (MXFP4 dequantized by
    the reader); gate/up columns de-interleaved into gate rows then up rows, as the kernels take them."""
    keys = fused_expert_keys(spec, layer)
    gate_up = ckpt.get_experts(keys["gate_up_proj"], ids, dtype).transpose(1, 2)  # [e, 2I, H], interleaved
    down = ckpt.get_experts(keys["down_proj"], ids, dtype).transpose(1, 2).contiguous()  # [e, H, I]
    gate_up_bias = ckpt.get_experts(keys["gate_up_proj_bias"], ids, dtype)  # [e, 2I], interleaved
    down_bias = ckpt.get_experts(keys["down_proj_bias"], ids, dtype)  # [e, H]
    return _deinterleave(gate_up), down, _deinterleave(gate_up_bias), down_bias


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[e, 2I, ...] with gate, up, gate, up... along dim 1 -> [e, 2I, ...] gate rows then up rows."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


READERS: dict[str, Callable[..., Parts]] = {
    EXPERTS_PER_EXPERT: _read_per_expert,
    EXPERTS_FUSED: _read_fused,
}


def _empty(spec: ModelSpec, dtype: torch.dtype) -> Parts:
    h, i = spec.hidden_size, spec.moe_intermediate_size
    gate_up, down = torch.empty((0, 2 * i, h), dtype=dtype), torch.empty((0, h, i), dtype=dtype)
    if not spec.expert_bias:
        return gate_up, down, None, None
    return gate_up, down, torch.empty((0, 2 * i), dtype=dtype), torch.empty((0, h), dtype=dtype)
