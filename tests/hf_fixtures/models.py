"""Tiny random checkpoints of each family, built with transformers' own model classes (see the package doc)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

INIT_STD = 0.15
LM_HEAD_STD = 0.4  # logits std ~2.5: top-1/top-2 gaps well above fp noise
ROUTER_LOGIT_STD = 3.0
E_SCORE_BIAS_STD = 0.1
NORM_JITTER = 0.1
BIAS_STD = 0.1
SINK_STD = 1.0  # attention sinks (gpt_oss): some heads give the sink a large share, some almost none

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

# Per-family config kwargs (vocab_size / tie_word_embeddings / token ids are added by _make_config).
FAMILY_CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
    ),
    "qwen2_moe": dict(
        hidden_size=32,
        intermediate_size=64,  # unused when every layer is sparse, kept for completeness
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        qkv_bias=True,
        decoder_sparse_step=1,
        use_sliding_window=False,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "qwen3_moe": dict(
        hidden_size=32,
        head_dim=16,  # != hidden_size // num_attention_heads on purpose
        intermediate_size=56,  # dense MLP of the mlp_only layer
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        use_sliding_window=False,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "minimax_m2": dict(
        hidden_size=48,
        head_dim=16,  # 4 * 16 = 64 != hidden_size on purpose (as in the real model: 48 * 128 != 3072)
        rotary_dim=8,  # legacy field of the released checkpoints -> partial_rotary_factor 0.5
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    ),
    "deepseek_v3": dict(
        hidden_size=64,
        intermediate_size=96,  # dense MLP of layer 0
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_nextn_predict_layers=0,  # no MTP weights are written
        max_position_embeddings=256,
    ),
    "glm4_moe": dict(  # GLM-4.5: qkv bias, half-rotary RoPE, per-head qk-norm, grouped router, dense layer 0
        hidden_size=48,
        head_dim=16,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        max_position_embeddings=256,
    ),
    "glm4_moe_lite": dict(  # GLM-4.7-Flash: DeepSeek-V3's MLA under GLM's mlp_layer_types
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        rope_interleave=True,
        mlp_layer_types=["dense", "sparse", "sparse"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=256,
    ),
    "gpt_oss": dict(  # sinks, sliding (8) / full attention alternating, q/k/v/o bias, YaRN, fused experts
        hidden_size=64,  # hidden and intermediate multiples of 32: the MXFP4 fixture quantizes the experts
        head_dim=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        attention_bias=True,
        swiglu_alpha=1.702,
        swiglu_limit=1.5,  # pre-activations have std ~1.2 here: the clamps bite on some of them
        rope_parameters={  # factor = max_position_embeddings / original, as in the release (131072 / 4096)
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    ),
}

FAMILIES = tuple(FAMILY_CONFIG_KWARGS)

_CONFIG_CLASS_NAMES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "minimax_m2": "MiniMaxM2Config",
    "deepseek_v3": "DeepseekV3Config",
    "glm4_moe": "Glm4MoeConfig",
    "glm4_moe_lite": "Glm4MoeLiteConfig",
    "gpt_oss": "GptOssConfig",
}

# In-memory (transformers) names of MoE routers: `<...>.mlp.gate.weight` (gpt_oss: `.mlp.router.weight`).
# Not `gate_proj`, not `shared_expert_gate`.
_ROUTER_RE = re.compile(r"\.mlp\.(gate|router)\.weight$")
_NORM_RE = re.compile(r"(norm|layernorm)[^.]*\.weight$")


def _make_config(family: str, *, vocab_size: int, tie_word_embeddings: bool, overrides: dict | None = None):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cls = getattr(transformers, _CONFIG_CLASS_NAMES[family])
    kwargs = dict(FAMILY_CONFIG_KWARGS[family])
    kwargs.update(
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID if vocab_size > BOS_TOKEN_ID else None,
        eos_token_id=EOS_TOKEN_ID if vocab_size > EOS_TOKEN_ID else None,
        pad_token_id=None,
        initializer_range=INIT_STD,
        dtype="float32",
    )
    kwargs.update(overrides or {})
    return cls(**kwargs)


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter and the e_score_correction_bias buffers, deterministically from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32)

    out_emb = model.get_output_embeddings()
    lm_head_ids = {id(out_emb.weight)} if out_emb is not None else set()
    for name, p in model.named_parameters():  # tied lm_head appears once, as the embedding
        if id(p) in lm_head_ids:
            val = LM_HEAD_STD * randn(p)
        elif _ROUTER_RE.search(name):
            val = randn(p) * (ROUTER_LOGIT_STD / math.sqrt(hidden))
        elif p.ndim == 1 and _NORM_RE.search(name):
            val = 1.0 + NORM_JITTER * randn(p)
        elif name.endswith((".bias", "_proj_bias")):  # gpt_oss experts: gate_up_proj_bias, down_proj_bias
            val = BIAS_STD * randn(p)
        elif name.endswith(".sinks"):
            val = SINK_STD * randn(p)
        elif p.ndim == 1:
            val = 1.0 + NORM_JITTER * randn(p)  # any other 1-D weight is a norm-like scale
        else:
            val = INIT_STD * randn(p)
        p.copy_(val.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_((E_SCORE_BIAS_STD * randn(b)).to(b.dtype))


def build_hf_model(
    family: str,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    tie_word_embeddings: bool = False,
    config_overrides: dict | None = None,
):
    """The randomized in-memory model that :func:`make_hf_checkpoint` saves (fp32, eval mode, eager attention).
    `config_overrides` replace config fields (e.g. ``rope_parameters`` of a long-context release)."""
    from transformers import AutoModelForCausalLM

    config = _make_config(
        family, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, overrides=config_overrides
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def make_hf_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    max_shard_size: str = "40KB",
    tie_word_embeddings: bool = False,
    config_overrides: dict | None = None,
) -> Path:
    """Builds a tiny random ``family`` model with transformers' classes and ``save_pretrained``s it (fp32,
    sharded safetensors + ``model.safetensors.index.json``, hub key layout). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(
        family,
        seed=seed,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        config_overrides=config_overrides,
    )
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return out
