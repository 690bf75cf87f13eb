"""gpt-oss (openai/gpt-oss-20b, -120b): its config.json keys turned into a ModelSpec.

Attention sinks, sliding-window and full attention alternating per `layer_types`, biases on q/k/v/o, YaRN;
a router with a bias (top-k on the logits, softmax over the k); experts fused per layer with biases and a
clamped SwiGLU, MXFP4 in the releases. Split from `families.py` (its registry) by size only.
"""

from __future__ import annotations

from typing import Any

from emoe.spec import (
    ACT_SWIGLU_CLAMPED,
    EXPERTS_FUSED,
    MXFP4_BLOCK,
    ROUTING_TOPK_SOFTMAX,
    ExpertActivation,
    ModelSpec,
    UnsupportedModelError,
    required_key,
)

LAYER_TYPES = ("sliding_attention", "full_attention")


def _sliding_layers(cfg: dict[str, Any], n: int) -> tuple[bool, ...]:
    """`layer_types`, or transformers' default for this family: even layers sliding, odd ones full."""
    types = cfg.get("layer_types")
    if types is None:
        return tuple(i % 2 == 0 for i in range(n))
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise UnsupportedModelError(f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")
    return tuple(t == "sliding_attention" for t in types)


def gpt_oss(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    head_dim = int(cfg.get("head_dim") or 64)  # transformers' defaults for this family, where a key is absent
    common = dict(
        common, head_dim=head_dim, rotary_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5))
    )
    n, hidden = common["num_layers"], common["hidden_size"]
    inter = required_key(cfg, "intermediate_size")
    if common["mxfp4"] and (hidden % MXFP4_BLOCK or inter % MXFP4_BLOCK):
        raise UnsupportedModelError(
            f"mxfp4 experts need hidden_size ({hidden}) and intermediate_size ({inter}) "
            f"divisible by {MXFP4_BLOCK}"
        )
    bias = bool(cfg.get("attention_bias", True))
    return ModelSpec(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=int(cfg.get("sliding_window") or 128),
        sliding_layers=_sliding_layers(cfg, n),
        attention_sinks=True,
        num_experts=required_key(cfg, "num_local_experts"),
        top_k=required_key(cfg, "num_experts_per_tok"),
        moe_intermediate_size=inter,
        routing=ROUTING_TOPK_SOFTMAX,
        moe_layers=(True,) * n,
        expert_activation=ExpertActivation(
            ACT_SWIGLU_CLAMPED,
            alpha=float(cfg.get("swiglu_alpha", 1.702)),
            limit=float(cfg.get("swiglu_limit", 7.0)),
        ),
        expert_bias=True,
        expert_layout=EXPERTS_FUSED,
        gate_name="router",
        gate_bias=True,
    )
