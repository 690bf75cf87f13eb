"""Scaled RoPE end to end: the in-process engine equals transformers over prompts longer than the original
(trained) context of each scaling, logits and greedy tokens."""

from __future__ import annotations

import pytest

from router import Engine
from tests.hf_fixtures import load_hf_model, make_hf_checkpoint
from tests.unit.test_hf_parity import hf_greedy, hf_logits

ORIGINAL = 16  # the "trained" context of these fixtures; prompts go well past it
LONG = [(7 * i + 3) % 120 + 3 for i in range(40)]
PROMPTS = [LONG, LONG[:5], LONG[5:26]]


def yarn(**extra):
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    } | extra


CASES = {
    # DeepSeek-V3 / Kimi-K2: YaRN with mscale / mscale_all_dim (softmax scale and cos/sin factor)
    "deepseek_v3-yarn": (
        "deepseek_v3",
        {"rope_parameters": yarn(mscale=1.0, mscale_all_dim=0.8), "max_position_embeddings": 64},
    ),
    "qwen3_moe-yarn": ("qwen3_moe", {"rope_parameters": yarn(), "max_position_embeddings": 64}),
    "mixtral-linear": (
        "mixtral",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "qwen2_moe-dynamic": (
        "qwen2_moe",
        {
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
            "max_position_embeddings": 24,
        },
    ),
    "minimax_m2-llama3": (
        "minimax_m2",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
            }
        },
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def scaled(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = make_hf_checkpoint(
        family, tmp_path_factory.mktemp(request.param), seed=5, config_overrides=overrides
    )
    return request.param, path, load_hf_model(path)


def test_logits_match_transformers_past_the_original_context(scaled):
    case, path, hf = scaled
    with Engine.from_pretrained(path) as engine:
        assert engine.spec.rope_scaling.type == CASES[case][1]["rope_parameters"]["rope_type"]
        ours = engine.logits(PROMPTS)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        err = (got - hf_logits(hf, prompt)).abs().max().item()
        assert err <= 1e-4, f"{case}: max abs logit error {err:.3g} at prompt length {len(prompt)}"


def test_greedy_generate_matches_transformers(scaled):
    case, path, hf = scaled
    with Engine.from_pretrained(path) as engine:
        ours = engine.generate(PROMPTS[:2], max_tokens=12, ignore_eos=True)
    for prompt, got in zip(PROMPTS[:2], ours, strict=True):
        want = hf_greedy(hf, prompt, 12)
        assert got[: len(want)] == want, f"{case}: greedy tokens differ for a prompt of {len(prompt)}"


def test_mla_latent_norms_use_transformers_fixed_eps(tmp_path):
    """DeepSeek-V3's q_a / kv_a latent norms keep eps 1e-6 whatever rms_norm_eps says (issue 14)."""
    path = make_hf_checkpoint("deepseek_v3", tmp_path / "eps", seed=2, config_overrides={"rms_norm_eps": 0.5})
    hf = load_hf_model(path)
    with Engine.from_pretrained(path) as engine:
        got = engine.logits([LONG[:9]])[0]
    assert (got - hf_logits(hf, LONG[:9])).abs().max().item() <= 1e-4
