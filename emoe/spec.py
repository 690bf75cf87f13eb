"""ModelSpec: what the engine needs to know of a checkpoint, read from its Hugging Face `config.json`.

One frozen dataclass covers the supported families; `ModelSpec.from_config` is the only place that
knows each family's config keys. Anything we do not implement is rejected here, by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emoe.generation import GenerationDefaults
from emoe.rope import RopeScaling

ROUTING_SOFTMAX = "softmax_topk"  # softmax -> top-k (-> renormalize)
ROUTING_SIGMOID_BIAS = "sigmoid_bias"  # sigmoid; top-k on score + bias; weights from unbiased score
ROUTING_GROUPED = "grouped_sigmoid_bias"  # DeepSeek-V3: sigmoid + bias, group-limited top-k
ROUTING_TOPK_SOFTMAX = "topk_softmax"  # gpt-oss: top-k on the logits, softmax over the k chosen

EXPERTS_PER_EXPERT = "per_expert"  # one (gate, up, down) weight triple per expert (expert_keys)
EXPERTS_FUSED = "fused"  # gpt-oss: all experts of a layer in one tensor, gate/up interleaved, with biases

MXFP4_BLOCK = 32  # MXFP4: values per power-of-two scale, along a weight's input dim

ACT_SILU = "silu"
ACT_SWIGLU_CLAMPED = "swiglu_clamped"


class UnsupportedModelError(ValueError):
    """The config names a model type or a setting this engine does not implement."""


@dataclass(frozen=True)
class FP8Spec:
    block: tuple[int, int]  # weight_block_size [out, in]


@dataclass(frozen=True)
class ExpertActivation:
    """The experts' gated activation of (gate, up): `silu` is silu(gate) * up; `swiglu_clamped` (gpt-oss) is
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit)."""

    kind: str = ACT_SILU
    alpha: float = 1.702
    limit: float = 7.0


SILU_GLU = ExpertActivation(ACT_SILU)


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial RoPE when < head_dim)
    max_position_embeddings: int
    tie_word_embeddings: bool
    # attention variants
    attention: str = "gqa"  # "gqa" | "mla"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None | "head" (per head, Qwen3) | "full" (whole projection, MiniMax-M2)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: sliding_window applies (empty: every layer)
    attention_sinks: bool = False  # a learned logit per head joins each softmax denominator (gpt-oss)
    rope_interleave: bool = False
    rope_scaling: RopeScaling = RopeScaling()
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    intermediate_size: int = 0  # dense MLP layers
    routing: str = ROUTING_SOFTMAX
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gated: bool = False  # shared expert output x sigmoid(shared_expert_gate(x))
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP (False)
    expert_activation: ExpertActivation = SILU_GLU
    expert_bias: bool = False  # biases on the experts' gate/up and down projections (gpt-oss)
    # checkpoint layout
    moe_prefix: str = "mlp"  # "block_sparse_moe" for mixtral / minimax_m2
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # or ("w1", "w3", "w2")
    expert_layout: str = EXPERTS_PER_EXPERT  # or EXPERTS_FUSED
    gate_name: str = "gate"  # the router's module under the MoE block ("router" for gpt-oss)
    gate_bias: bool = False  # the router has a bias added to its logits (gpt-oss)
    bias_key: str | None = None  # e_score_correction_bias, relative to the layer's MoE block
    fp8: FP8Spec | None = None
    mxfp4: bool = False  # routed experts stored as MXFP4 `*_blocks` + `*_scales` (gpt-oss releases)
    ignore_layers_from: int = 0  # layer indices >= this in the checkpoint are ignored (DeepSeek MTP)
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None

    # ---- derived -------------------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention, None for full attention."""
        if self.sliding_layers and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        if self.attention == "mla":  # DeepSeek: a scaled RoPE also scales the softmax
            return (
                self.qk_nope_head_dim + self.qk_rope_head_dim
            ) ** -0.5 * self.rope_scaling.mla_softmax_scale()
        return self.head_dim**-0.5

    @property
    def max_context(self) -> int:
        """Positions the model is trained (or scaled) for: max_position_embeddings, times the RoPE
        factor when the release's max_position_embeddings is the original, unscaled one."""
        s = self.rope_scaling
        if (
            s.original_max_position_embeddings
            and s.original_max_position_embeddings < self.max_position_embeddings
        ):
            return self.max_position_embeddings  # already the extended context (Qwen3, DeepSeek-V3 style)
        return int(self.max_position_embeddings * s.context_factor)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
        spec = cls.from_config(cfg)
        extra = GenerationDefaults.from_pretrained(path).eos_token_ids  # MiniMax-M2 has its eos only there
        eos = tuple(dict.fromkeys(spec.eos_token_ids + tuple(i for i in extra if 0 <= i < spec.vocab_size)))
        return dataclasses.replace(spec, eos_token_ids=eos) if eos != spec.eos_token_ids else spec

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        from emoe.families import build_spec  # the family builders construct ModelSpecs

        return build_spec(cfg)


def required_key(cfg: dict[str, Any], key: str) -> Any:
    """cfg[key], or ValueError naming the key and the model type."""
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json ({cfg.get('model_type')}): missing required key {key!r}")
    return cfg[key]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
