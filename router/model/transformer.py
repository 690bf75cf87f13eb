"""The router half of an MoE model: embeddings, attention, norms, gates, shared experts, dense MLPs, LM head.

The routed experts are not here: every MoE layer hands its tokens to a `Dispatcher` and adds what comes back.
Legend: T tokens in the step, H hidden, V vocab, k experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from emoe.spec import ModelSpec
from router.dispatch.base import Dispatcher
from router.model.attention import GQAAttention, MLAAttention, Segments
from router.model.gating import Gate
from router.model.layers import Linear, fused, rms_norm
from router.model.rope import Rope

Getter = Callable[..., torch.Tensor]  # get(name, dtype=None) -> tensor


class MLP:
    """down(silu(gate x) * up x), gate and up as one projection."""

    def __init__(self, get: Getter, prefix: str):
        gate, up, down = (get(f"{prefix}.{n}_proj.weight") for n in ("gate", "up", "down"))
        self.gate_up, self.down = Linear(fused(gate, up)), Linear(down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class MoEBlock:
    """Gate and shared expert of one MoE layer; the routed experts are reached through the dispatcher."""

    def __init__(self, spec: ModelSpec, layer: int, get: Getter):
        p = f"model.layers.{layer}.{spec.moe_prefix}"
        self.layer = layer
        bias = get(f"{p}.{spec.bias_key}", torch.float32) if spec.bias_key else None
        gate = f"{p}.{spec.gate_name}"
        logit_bias = get(f"{gate}.bias") if spec.gate_bias else None
        self.gate = Gate(
            spec, get(f"{gate}.weight", torch.float32 if spec.bias_key else None), bias, logit_bias
        )
        self.shared = None
        self.shared_gate = None
        if spec.shared_intermediate_size:
            self.shared = MLP(get, f"{p}.shared_expert" if spec.shared_gated else f"{p}.shared_experts")
            if spec.shared_gated:
                self.shared_gate = get(f"{p}.shared_expert_gate.weight")  # [1, H]

    async def __call__(self, x: torch.Tensor, dispatcher: Dispatcher) -> torch.Tensor:
        ids, weights = self.gate(x)  # [T, k], [T, k]
        y = await dispatcher.forward(self.layer, x, ids, weights)  # [T, H]
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(x, self.shared_gate)) * s
            y = y + s
        return y


class DecoderLayer:
    def __init__(self, spec: ModelSpec, layer: int, get: Getter, rope: Rope):
        p = f"model.layers.{layer}"
        self.eps = spec.rms_norm_eps
        self.in_norm = get(f"{p}.input_layernorm.weight")
        self.post_norm = get(f"{p}.post_attention_layernorm.weight")
        self.attn = (MLAAttention if spec.attention == "mla" else GQAAttention)(spec, layer, get, rope)
        self.moe = MoEBlock(spec, layer, get) if spec.moe_layers[layer] else None
        self.mlp = None if self.moe else MLP(get, f"{p}.mlp")

    async def __call__(self, h, cos_sin, segments: Segments, dispatcher: Dispatcher) -> torch.Tensor:
        h = h + self.attn(rms_norm(h, self.in_norm, self.eps), cos_sin, segments)
        x = rms_norm(h, self.post_norm, self.eps)
        y = await self.moe(x, dispatcher) if self.moe else self.mlp(x)
        return h + y


class RouterModel:
    """Dense half of the model over a flattened batch of sequence segments."""

    def __init__(self, spec: ModelSpec, get: Getter, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.embed = get("model.embed_tokens.weight")  # [V, H]
        self.head = Linear(self.embed if spec.tie_word_embeddings else get("lm_head.weight"))  # [V, H]
        self.norm = get("model.norm.weight")
        self.device = self.embed.device
        self.rope = Rope(
            spec.rotary_dim,
            spec.rope_theta,
            scaling=spec.rope_scaling,
            max_position_embeddings=spec.max_position_embeddings,
            interleave=spec.rope_interleave,
            device=self.device,
        )
        self.layers = [DecoderLayer(spec, i, get, self.rope) for i in range(spec.num_layers)]

    async def forward(self, tokens: torch.Tensor, segments: Segments, dispatcher: Dispatcher) -> torch.Tensor:
        """tokens [T] -> final hidden states [T, H]; appends every segment's keys and values to its cache."""
        positions = torch.cat([torch.arange(s.past, s.past + s.n) for s in segments]).to(self.device)  # [T]
        ends = None
        if self.rope.scaling.type == "dynamic":  # per-sequence lengths [T]
            ends = torch.cat([torch.full((s.n,), s.past + s.n) for s in segments]).to(self.device)
        cos_sin = self.rope.cos_sin(positions, self.dtype, ends)
        h = F.embedding(tokens, self.embed)  # [T, H]
        for layer in self.layers:
            h = await layer(h, cos_sin, segments, dispatcher)
        for s in segments:
            s.cache.advance(s.n)
        return rms_norm(h, self.norm, self.spec.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] in float32."""
        return self.head(h).float()
