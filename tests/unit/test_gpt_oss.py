"""gpt_oss against transformers' GptOssForCausalLM: the spec of a release config, MXFP4 experts, the fused
expert layout read by rows, the clamped SwiGLU, and serving (AsyncEngine over paged caches) == Engine."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from emoe.checkpoint import Checkpoint, dequantize_mxfp4
from emoe.layout import fused_expert_keys
from emoe.placement import Placement
from emoe.spec import (
    ACT_SWIGLU_CLAMPED,
    EXPERTS_FUSED,
    ROUTING_TOPK_SOFTMAX,
    ModelSpec,
    UnsupportedModelError,
)
from experts.ffn import clamped_swiglu
from experts.store import ExpertStore
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig
from tests.hf_fixtures import build_hf_model, make_hf_checkpoint
from tests.hf_fixtures.mxfp4 import load_hf_mxfp4_model, make_mxfp4_gpt_oss_checkpoint, quantize_mxfp4
from tests.unit.test_hf_parity import PROMPTS, hf_greedy, hf_logits

SEED = 5
# the release's config.json (openai/gpt-oss-20b), shrunk: legacy rope keys, mxfp4, no swiglu_alpha
RELEASE = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_hf_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), seed=SEED)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    path = make_mxfp4_gpt_oss_checkpoint(tmp_path_factory.mktemp("gpt_oss_mxfp4"), seed=SEED)
    return path, load_hf_mxfp4_model(path)


def test_release_config():
    spec = ModelSpec.from_config(RELEASE)
    assert spec.sliding_layers == (True, False, True, False) and spec.attention_sinks
    assert [spec.window(i) for i in range(4)] == [128, None, 128, None]
    assert spec.mxfp4 and spec.fp8 is None and spec.expert_layout == EXPERTS_FUSED
    assert spec.routing == ROUTING_TOPK_SOFTMAX and spec.gate_name == "router" and spec.gate_bias
    act = spec.expert_activation
    assert (act.kind, act.alpha, act.limit) == (ACT_SWIGLU_CLAMPED, 1.702, 7.0)
    assert spec.qkv_bias and spec.o_bias and spec.expert_bias
    assert (spec.rope_scaling.type, spec.rope_scaling.factor, spec.rope_scaling.truncate) == (
        "yarn",
        32.0,
        False,
    )
    assert spec.max_context == 131072 and spec.eos_token_ids == (200002,)


def test_mxfp4_is_refused_for_other_families():
    from emoe.demo import demo_config

    with pytest.raises(UnsupportedModelError, match="mxfp4 for gpt_oss"):
        ModelSpec.from_config({**demo_config("demo"), "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        ModelSpec.from_config({**RELEASE, "layer_types": ["chunked_attention", "full_attention"] * 2})


def test_unsupported_family_lists_gpt_oss(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="supported: .*gpt_oss"):
        Engine.from_pretrained(tmp_path)


def test_dequantize_mxfp4_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)  # every code
    scales = torch.randint(100, 150, (3, 40, 2), generator=g, dtype=torch.uint8)
    scales[0, 0, 0], scales[0, 0, 1] = 0, 255  # the extremes of the exponent
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [3, 64, 40]
    got = dequantize_mxfp4(blocks, scales).transpose(1, 2)
    assert torch.equal(got, want)


def test_quantize_mxfp4_round_trips():
    w = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1)) * 0.2
    got = dequantize_mxfp4(*quantize_mxfp4(w))
    assert got.shape == w.shape
    # per block of 32 a scale 2^e in [amax / 6, amax / 3); E2M1 steps are at most 2 (4 -> 6): the error of
    # the nearest code is at most one scale unit
    amax = w.view(2, 8, 2, 32).abs().amax(dim=-1, keepdim=True)
    assert ((got - w).view(2, 8, 2, 32).abs() <= amax / 3).all()
    assert not torch.equal(got, w)


def test_mxfp4_checkpoint_equals_transformers(mxfp4):
    path, hf = mxfp4
    with Engine.from_pretrained(path) as engine:
        ours = engine.logits(PROMPTS)
        gen = engine.generate(PROMPTS, max_tokens=12)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert (got - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    assert gen == [hf_greedy(hf, p, 12) for p in PROMPTS]


def test_mxfp4_weights_are_transformers_dequantized_weights(mxfp4):
    path, hf = mxfp4
    spec = ModelSpec.from_pretrained(path)
    ckpt = Checkpoint(path, spec)
    keys = fused_expert_keys(spec, 2)
    for role in ("gate_up_proj", "down_proj"):
        want = hf.state_dict()[keys[role]]  # [E, in, out]
        assert torch.equal(ckpt.get_experts(keys[role], range(spec.num_experts)), want)
        assert torch.equal(ckpt.get_experts(keys[role], [5, 1]), want[[5, 1]])
    original = build_hf_model("gpt_oss", seed=SEED).state_dict()[keys["down_proj"]]
    assert not torch.equal(hf.state_dict()[keys["down_proj"]], original)  # quantized for real


def test_expert_group_reads_only_its_rows(mxfp4):
    path, _ = mxfp4
    spec = ModelSpec.from_pretrained(path)
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, 3)
    ckpt = Checkpoint(path, spec)
    ExpertStore.from_checkpoint(ckpt, spec, placement.groups[1])
    full = Checkpoint(path)
    want = 0
    for layer, ids in placement.groups[1].items():
        for name in ckpt.stats.tensors_read & {n for n in ckpt.weight_map if f"layers.{layer}." in n}:
            t = full.get(name, torch.uint8) if name.endswith(("_blocks", "_scales")) else full.get(name)
            want += t[0].numel() * t.element_size() * len(ids)
    assert ckpt.stats.data_bytes_read == want < full.stats.data_bytes_read / 2
    assert all(".mlp.experts." in n for n in ckpt.stats.tensors_read)


@pytest.mark.parametrize("groups", [2, 3])
def test_expert_groups_in_process_equal_one_group(mxfp4, groups):
    path, _ = mxfp4
    with Engine.from_pretrained(path) as one, Engine.from_pretrained(path, num_groups=groups) as many:
        for a, b in zip(one.logits(PROMPTS), many.logits(PROMPTS), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_clamped_swiglu_equals_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    hf = build_hf_model("gpt_oss").model.layers[0].mlp.experts
    assert isinstance(hf, GptOssExperts) and hf.limit == 1.5
    gate_up = 3 * torch.randn(50, 64, generator=torch.Generator().manual_seed(2))  # interleaved
    got = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], alpha=hf.alpha, limit=hf.limit)
    assert torch.equal(got, hf._apply_gate(gate_up))


def test_store_equals_transformers_experts(plain):
    """The expert half alone: our store's mixture equals GptOssExperts.forward on the same routing."""
    hf = build_hf_model("gpt_oss", seed=SEED).model.layers[1].mlp.experts
    spec = ModelSpec.from_pretrained(plain)
    store = ExpertStore.from_checkpoint(Checkpoint(plain, spec), spec, {1: range(spec.num_experts)})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:2] for _ in range(20)])
    w = torch.softmax(torch.randn(20, 2, generator=g), dim=-1)
    gate_up = torch.einsum("nh,nho->no", x, hf.gate_up_proj[ids[:, 0]].detach())  # [n, 2I]
    assert (gate_up.abs() > hf.limit).float().mean() > 0.05  # the clamps are exercised
    with torch.no_grad():
        want = hf(x, ids, w)
    torch.testing.assert_close(store.forward(1, x, ids, w), want, atol=1e-5, rtol=1e-5)


SERVE_PROMPTS = [list(range(3, 16)), [9] * 40, [5, 6, 7], list(range(60, 88))]  # 13-40 > window 8


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(max_batch_tokens=8), dict(kv_blocks=20, block_size=4), dict(micro_batches=2)],
    ids=["roomy", "chunked-prefill", "tight-kv", "ping-pong"],
)
def test_serving_decode_equals_engine(plain, cfg):
    """AsyncEngine over paged caches (batched decode attention: sinks, per-layer windows) == Engine."""
    with Engine.from_pretrained(plain, num_groups=2) as engine:
        want = engine.generate(SERVE_PROMPTS, max_tokens=12, ignore_eos=True)

        async def run():
            from emoe.api import GenerateRequest, SamplingParams

            ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, EngineConfig(**cfg))

            async def one(i, prompt):
                req = GenerateRequest(f"r{i}", tuple(prompt), SamplingParams(max_tokens=12, ignore_eos=True))
                return [t async for c in ae.generate(req) for t in c.token_ids]

            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(SERVE_PROMPTS)))
            stats = ae.stats()
            await ae.close()
            return outs, stats

        outs, stats = asyncio.run(run())
    assert outs == want
    if cfg.get("kv_blocks") == 20:
        assert stats["preemptions"] > 0
