import json

import pytest

from emoe.demo import demo_config
from emoe.spec import ROUTING_GROUPED, ModelSpec, UnsupportedModelError


def test_minimax_partial_rope_from_rotary_dim():
    spec = ModelSpec.from_config(demo_config("demo"))
    assert spec.family == "minimax_m2"
    assert (spec.head_dim, spec.rotary_dim) == (32, 16)
    assert spec.qk_norm == "full" and spec.bias_key == "e_score_correction_bias"
    assert spec.moe_layer_ids == [0, 1, 2, 3]


def test_deepseek_dense_first_layers_and_grouped_routing():
    cfg = {
        "model_type": "deepseek_v3",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "n_shared_experts": 2,
        "moe_intermediate_size": 8,
        "intermediate_size": 48,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "rope_theta": 10000.0,
    }
    spec = ModelSpec.from_config(cfg)
    assert spec.moe_layers == (False, True, True)
    assert spec.routing == ROUTING_GROUPED and spec.shared_intermediate_size == 16
    assert spec.attention == "mla" and spec.attn_scale == pytest.approx(12**-0.5)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ],
)
def test_unsupported_settings_are_named(change, needle):
    with pytest.raises(UnsupportedModelError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        ModelSpec.from_config({**demo_config("demo"), **change})


def test_missing_required_key_is_named():
    cfg = demo_config("demo")
    del cfg["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize(
    "change, rotary_dim",
    [
        ({"rotary_dim": 16}, 16),  # the MiniMax-M2 releases' legacy field
        ({"rotary_dim": 16, "partial_rotary_factor": 1.0}, 32),  # partial_rotary_factor wins (transformers)
        ({"partial_rotary_factor": 0.25}, 8),
    ],
)
def test_minimax_rotary_dim_follows_transformers_precedence(change, rotary_dim):
    cfg = {k: v for k, v in demo_config("demo").items() if k not in ("rotary_dim", "partial_rotary_factor")}
    assert ModelSpec.from_config({**cfg, **change}).rotary_dim == rotary_dim


def test_rotary_dim_is_ignored_outside_minimax(tmp_path):
    from tests.hf_fixtures import make_hf_checkpoint

    cfg = json.loads((make_hf_checkpoint("qwen3_moe", tmp_path / "q") / "config.json").read_text())
    spec = ModelSpec.from_config({**cfg, "rotary_dim": 4})  # transformers' Qwen3-MoE has no such field
    assert spec.rotary_dim == spec.head_dim
