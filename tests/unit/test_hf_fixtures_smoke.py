"""Smoke tests for tests/hf_fixtures.py: every builder writes a sharded, hub-layout checkpoint that
transformers loads back exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, so `tests.hf_fixtures` imports

from safetensors import safe_open  # noqa: E402

from tests.hf_fixtures import (  # noqa: E402
    FAMILIES,
    build_hf_model,
    dequantize_fp8_block,
    load_hf_model,
    make_fp8_minimax_checkpoint,
    make_hf_checkpoint,
)

PROMPT = torch.tensor([[1, 17, 42, 99, 5]])

# Hub-layout keys per family that prove experts / routers / shared experts are stored as the hub stores
# them: per expert, except gpt_oss, whose releases keep a layer's experts in fused tensors.
EXPECTED_KEYS = {
    "mixtral": [
        "model.layers.1.block_sparse_moe.experts.3.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
    ],
    "qwen2_moe": [
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ],
    "qwen3_moe": [
        "model.layers.0.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",  # mlp_only layer: dense MLP
        "model.layers.2.mlp.gate.weight",
        "model.layers.0.self_attn.q_norm.weight",
    ],
    "minimax_m2": [
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
        "model.layers.1.block_sparse_moe.e_score_correction_bias",
        "model.layers.0.self_attn.q_norm.weight",
    ],
    "deepseek_v3": [
        "model.layers.0.mlp.gate_proj.weight",  # first_k_dense_replace=1
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.2.mlp.gate.e_score_correction_bias",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    ],
    "glm4_moe": [
        "model.layers.0.mlp.gate_proj.weight",  # first_k_dense_replace=1
        "model.layers.1.mlp.experts.7.up_proj.weight",
        "model.layers.2.mlp.shared_experts.down_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.q_norm.weight",
    ],
    "glm4_moe_lite": [
        "model.layers.0.mlp.gate_proj.weight",  # mlp_layer_types[0] == "dense"
        "model.layers.2.mlp.experts.7.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.self_attn.kv_b_proj.weight",
    ],
    "gpt_oss": [
        "model.layers.1.mlp.experts.gate_up_proj",  # [E, H, 2I], gate / up columns interleaved
        "model.layers.1.mlp.experts.gate_up_proj_bias",
        "model.layers.3.mlp.experts.down_proj",
        "model.layers.3.mlp.experts.down_proj_bias",
        "model.layers.0.mlp.router.weight",
        "model.layers.0.mlp.router.bias",
        "model.layers.2.self_attn.sinks",
        "model.layers.0.self_attn.o_proj.bias",
    ],
}
FUSED_ON_THE_HUB = {"gpt_oss"}


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_make_hf_checkpoint_loads(family, tmp_path):
    path = make_hf_checkpoint(family, tmp_path / family, seed=0)
    index = _index(path)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, shards
    assert all((path / s).is_file() for s in shards)
    keys = set(index["weight_map"])
    for key in EXPECTED_KEYS[family]:
        assert key in keys, key
    if family not in FUSED_ON_THE_HUB:
        assert not any("gate_up_proj" in k for k in keys), "fused in-memory layout leaked into the files"

    model = load_hf_model(path)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert logits.shape == (1, 5, 128)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5  # not near-uniform

    # logits are spread out: greedy decoding is rarely decided by a near-tie
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 1e-3).float().mean() >= 0.97

    # save -> load is exact: same logits as the in-memory model the checkpoint came from
    with torch.no_grad():
        expected = build_hf_model(family, seed=0)(PROMPT).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_seed_changes_weights(tmp_path):
    a = build_hf_model("mixtral", seed=0).state_dict()
    b = build_hf_model("mixtral", seed=0).state_dict()
    c = build_hf_model("mixtral", seed=1).state_dict()
    name = "model.layers.0.mlp.gate.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_minimax_partial_rotary_roundtrip(tmp_path):
    path = make_hf_checkpoint("minimax_m2", tmp_path / "mm")
    raw = json.loads((path / "config.json").read_text())
    assert raw["head_dim"] == 16
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5


def test_deepseek_config(tmp_path):
    path = make_hf_checkpoint("deepseek_v3", tmp_path / "ds")
    raw = json.loads((path / "config.json").read_text())
    assert raw["n_group"] == 4 and raw["topk_group"] == 2 and raw["first_k_dense_replace"] == 1
    assert raw["rope_interleave"] is True and raw["routed_scaling_factor"] == 2.5


def test_tied_embeddings(tmp_path):
    path = make_hf_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in _index(path)["weight_map"]
    model = load_hf_model(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as so:
            out.update({k: so.get_tensor(k) for k in so.keys()})
    return out


def test_fp8_minimax_checkpoint(tmp_path):
    path = make_fp8_minimax_checkpoint(tmp_path / "fp8", seed=0, block=(16, 16))
    index = _index(path)
    assert len(set(index["weight_map"].values())) > 1
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    }

    tensors = _read_all(path)
    fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert "model.layers.0.self_attn.q_proj.weight" in fp8
    assert "model.layers.1.block_sparse_moe.experts.5.w2.weight" in fp8
    for k in fp8:
        s = tensors[k + "_scale_inv"]
        assert s.dtype == torch.float32
        assert tuple(s.shape) == tuple(-(-d // 16) for d in tensors[k].shape)
    for k in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.e_score_correction_bias",
        "model.layers.0.self_attn.q_norm.weight",
    ):
        assert tensors[k].dtype == torch.float32, k

    model = load_hf_model(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = dequantize_fp8_block(tensors[name], tensors[name + "_scale_inv"], (16, 16))
    got = model.state_dict()[name]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    original = build_hf_model("minimax_m2", seed=0).state_dict()[name]
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 relative per element (+ subnormals near zero)
    assert ((got - original).abs() <= original.abs() / 16 + 1e-3).all()
    assert not torch.equal(got, original)
    # experts are dequantized too (fused in memory: gate_up_proj = [w1; w3] per expert)
    w1 = dequantize_fp8_block(
        tensors["model.layers.1.block_sparse_moe.experts.5.w1.weight"],
        tensors["model.layers.1.block_sparse_moe.experts.5.w1.weight_scale_inv"],
        (16, 16),
    )
    gate_up = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"][5]
    torch.testing.assert_close(gate_up[: w1.shape[0]], w1, rtol=0, atol=0)

    with torch.no_grad():
        logits = model(PROMPT).logits
    assert logits.shape == (1, 5, 128) and torch.isfinite(logits).all()


def test_fp8_minimax_partial_blocks(tmp_path):
    # 24 does not divide 64 / 32 / 48: partial edge blocks, dequantized by load_hf_model itself
    path = make_fp8_minimax_checkpoint(tmp_path / "fp8p", block=(24, 24))
    tensors = _read_all(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tuple(tensors[name + "_scale_inv"].shape) == (3, 2)  # q_proj is [64, 48]
    model = load_hf_model(path)
    expected = dequantize_fp8_block(tensors[name], tensors[name + "_scale_inv"], (24, 24))
    torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()
