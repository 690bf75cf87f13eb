"""RoPE scalings against transformers' own frequency functions, read from config.json as releases write it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from emoe.spec import ModelSpec
from router.model.rope import Rope, dynamic_inv_freq
from tests.hf_fixtures import make_hf_checkpoint

YARN_DEEPSEEK = {  # DeepSeek-V3 / Kimi-K2 release (legacy key, values as shipped)
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
CASES = {
    "yarn-deepseek": ("deepseek_v3", {"rope_scaling": YARN_DEEPSEEK, "max_position_embeddings": 163840}),
    "yarn-qwen3": (
        "qwen3_moe",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "yarn-attention-factor": (
        "qwen3_moe",
        {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8, "beta_fast": 16}},
    ),
    "linear": ("mixtral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic": ("qwen2_moe", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": (
        "qwen3_moe",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
}


def config_dict(tmp_path, family, change):
    import json

    path = make_hf_checkpoint(family, tmp_path / family)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]  # the hub's legacy layout
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    return path, cfg


@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_and_attention_factor_equal_transformers(tmp_path, case):
    family, change = CASES[case]
    path, cfg = config_dict(tmp_path, family, change)
    spec = ModelSpec.from_config(cfg)
    hf = AutoConfig.from_pretrained(path)
    rope_type = hf.rope_parameters["rope_type"]
    assert rope_type == spec.rope_scaling.type
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    rope = Rope(
        spec.rotary_dim,
        spec.rope_theta,
        scaling=spec.rope_scaling,
        max_position_embeddings=spec.max_position_embeddings,
    )
    torch.testing.assert_close(rope.inv_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(want_factor)
    if rope_type == "dynamic":  # past the trained context, the base grows with the sequence
        longer = 3 * spec.max_position_embeddings
        got = dynamic_inv_freq(
            spec.rotary_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings, longer
        )
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=longer)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


def test_deepseek_yarn_scales_the_softmax_by_mscale_squared(tmp_path):
    _, cfg = config_dict(tmp_path, "deepseek_v3", CASES["yarn-deepseek"][1])
    spec = ModelSpec.from_config(cfg)
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    assert spec.attn_scale == pytest.approx(dim**-0.5 * mscale**2)
    assert spec.max_context == 163840  # max_position_embeddings is already the extended context


def test_context_is_extended_by_the_factor_when_max_positions_is_the_original(tmp_path):
    _, cfg = config_dict(tmp_path, "mixtral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    spec = ModelSpec.from_config(cfg)
    assert spec.max_context == 2 * spec.max_position_embeddings
