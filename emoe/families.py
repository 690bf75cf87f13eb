"""The config.json of each supported family, as its releases write it, turned into a ModelSpec.

The only place that knows each family's config keys. Unknown model_type or unsupported settings raise
UnsupportedModelError naming them.
"""

from __future__ import annotations

from typing import Any

from emoe.families_gpt_oss import gpt_oss
from emoe.rope import UnsupportedRope, parse_rope
from emoe.spec import (
    ROUTING_GROUPED,
    ROUTING_SIGMOID_BIAS,
    ROUTING_SOFTMAX,
    FP8Spec,
    ModelSpec,
    UnsupportedModelError,
)
from emoe.spec import required_key as _req

MXFP4_FAMILIES = ("gpt_oss",)  # the families whose releases ship MXFP4 experts


def build_spec(cfg: dict[str, Any]) -> ModelSpec:
    model_type = cfg.get("model_type")
    if model_type not in BUILDERS:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    _check_common(cfg)
    return BUILDERS[model_type](cfg, _common_fields(cfg))


def _check_common(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"unsupported setting hidden_act={act!r} (only 'silu')")
    if cfg.get("quantization_config"):
        q = cfg["quantization_config"]
        if q.get("quant_method") == "mxfp4" and cfg.get("model_type") in MXFP4_FAMILIES:
            return
        if q.get("quant_method") != "fp8" or not q.get("weight_block_size"):
            raise UnsupportedModelError(
                f"unsupported setting quantization_config={q!r} (only block-wise fp8 with weight_block_size, "
                f"or mxfp4 for {', '.join(MXFP4_FAMILIES)})"
            )


def _eos(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    ids = (eos,) if isinstance(eos, int) else tuple(eos)
    return tuple(i for i in ids if 0 <= i < cfg["vocab_size"])


def _common_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim") or hidden // heads
    try:
        theta, partial, scaling = parse_rope(cfg)
    except UnsupportedRope as e:
        raise UnsupportedModelError(str(e)) from e
    partial = partial if partial is not None else 1.0  # rotary_dim is MiniMax-M2's (see its builder)
    q = cfg.get("quantization_config") or {}
    bos = cfg.get("bos_token_id")
    return dict(
        family=cfg["model_type"],
        vocab_size=_req(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=_req(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_dim=int(head_dim * partial),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        fp8=FP8Spec(tuple(q["weight_block_size"])) if q.get("quant_method") == "fp8" else None,
        mxfp4=q.get("quant_method") == "mxfp4",
        eos_token_ids=_eos(cfg),
        bos_token_id=bos if isinstance(bos, int) and 0 <= bos < cfg["vocab_size"] else None,
        ignore_layers_from=int(cfg["num_hidden_layers"]),
    )


def _qwen_moe_layers(cfg: dict[str, Any], num_experts: int) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    n = cfg["num_hidden_layers"]
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(n))


def _no_sliding(cfg: dict[str, Any]) -> None:
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("unsupported setting use_sliding_window=true")


def _block_sparse_moe(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The MoE fields of Mixtral's layout (`block_sparse_moe`, experts w1/w3/w2), shared by MiniMax-M2."""
    return dict(
        num_experts=_req(cfg, "num_local_experts"),
        top_k=_req(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_req(cfg, "intermediate_size"),
        norm_topk_prob=True,
        moe_layers=(True,) * num_layers,
        moe_prefix="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
    )


def _mixtral(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        **common,
        **_block_sparse_moe(cfg, common["num_layers"]),
        sliding_window=cfg.get("sliding_window"),
        routing=ROUTING_SOFTMAX,
    )


def _qwen_moe(cfg: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """The MoE fields Qwen2-MoE and Qwen3-MoE share: softmax top-k, dense layers by step / list."""
    return dict(
        num_experts=num_experts,
        top_k=_req(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_req(cfg, "moe_intermediate_size"),
        intermediate_size=cfg.get("intermediate_size", 0),
        routing=ROUTING_SOFTMAX,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=_qwen_moe_layers(cfg, num_experts),
    )


def _qwen2_moe(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    _no_sliding(cfg)
    num_experts = _req(cfg, "num_experts")
    return ModelSpec(
        **common,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        **_qwen_moe(cfg, num_experts),
        shared_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
        shared_gated=True,
    )


def _qwen3_moe(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    _no_sliding(cfg)
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if num_experts is None:
        raise ValueError("config.json (qwen3_moe): missing required key 'num_experts'")
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        **_qwen_moe(cfg, num_experts),
    )


def _minimax_m2(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    if cfg.get("use_qk_norm") is False:
        raise UnsupportedModelError("unsupported setting use_qk_norm=false for minimax_m2")
    qk_norm_type = cfg.get("qk_norm_type", "per_layer")
    if qk_norm_type != "per_layer":
        raise UnsupportedModelError(f"unsupported setting qk_norm_type={qk_norm_type!r} (only 'per_layer')")
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise UnsupportedModelError(f"unsupported setting scoring_func={scoring!r} for minimax_m2")
    _, partial, _ = parse_rope(cfg)
    if partial is None and cfg.get("rotary_dim"):  # the releases' legacy field; partial_rotary_factor wins
        common = dict(common, rotary_dim=int(cfg["rotary_dim"]))
    return ModelSpec(
        **common,
        **_block_sparse_moe(cfg, common["num_layers"]),
        qk_norm="full",
        routing=ROUTING_SIGMOID_BIAS,
        bias_key="e_score_correction_bias",
    )


def _grouped_routing(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3's router (sigmoid + correction bias, group-limited top-k), which GLM-4.5 shares."""
    num_experts = _req(cfg, "n_routed_experts")
    n_group, topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if num_experts % n_group:
        raise UnsupportedModelError(f"n_routed_experts={num_experts} is not divisible by n_group={n_group}")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise UnsupportedModelError(f"unsupported setting scoring_func={cfg['scoring_func']!r}")
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedModelError(f"unsupported setting topk_method={cfg['topk_method']!r}")
    return dict(
        num_experts=num_experts,
        top_k=_req(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_req(cfg, "moe_intermediate_size"),
        intermediate_size=_req(cfg, "intermediate_size"),
        routing=ROUTING_GROUPED,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        shared_intermediate_size=cfg["moe_intermediate_size"] * int(cfg.get("n_shared_experts") or 0),
        bias_key="gate.e_score_correction_bias",
    )


def _dense_first(cfg: dict[str, Any], n: int) -> tuple[bool, ...]:
    """MoE layers: `mlp_layer_types` ("dense" / "sparse") where the release has it, else all but the
    first `first_k_dense_replace`."""
    types = cfg.get("mlp_layer_types")
    if types is not None:
        if len(types) != n:
            raise ValueError(f"mlp_layer_types has {len(types)} entries for {n} layers")
        return tuple(t == "sparse" for t in types)
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    return tuple(i >= first_dense for i in range(n))


def _deepseek_v3(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    """DeepSeek-V3 / R1 / V3.1 and the releases built on its architecture (Kimi-K2, GLM-4.7-Flash)."""
    n = common["num_layers"]
    rope_dim = _req(cfg, "qk_rope_head_dim")
    bias = bool(cfg.get("attention_bias", False))
    common = dict(common, head_dim=rope_dim, rotary_dim=rope_dim)
    return ModelSpec(
        **common,
        **_grouped_routing(cfg),
        attention="mla",
        qkv_bias=bias,
        o_bias=bias,
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=_req(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_req(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=_req(cfg, "v_head_dim"),
        moe_layers=_dense_first(cfg, n),
    )


def _glm4_moe(cfg: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    """GLM-4.5 / 4.6 / 4.7: GQA with qkv bias, half-rotary RoPE unless set, optional per-head qk-norm,
    DeepSeek-V3's router and shared experts, dense first layers; the MTP layer (layer N) is skipped."""
    _, partial, _ = parse_rope(cfg)
    partial = 0.5 if partial is None else partial  # transformers' default for this family
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **dict(common, rotary_dim=int(common["head_dim"] * partial)),
        **_grouped_routing(cfg),
        qkv_bias=bias,
        qk_norm="head" if cfg.get("use_qk_norm") else None,
        moe_layers=_dense_first(cfg, common["num_layers"]),
    )


BUILDERS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "minimax_m2": _minimax_m2,
    "deepseek_v3": _deepseek_v3,
    "kimi_k2": _deepseek_v3,  # Kimi-K2: the DeepSeek-V3 architecture under its own model_type
    "glm4_moe_lite": _deepseek_v3,  # GLM-4.7-Flash: DeepSeek-V3's MLA and router under GLM's layer list
    "glm4_moe": _glm4_moe,
    "gpt_oss": gpt_oss,
}

FAMILIES = tuple(BUILDERS)
