"""Checkpoints shaped like the hub releases people run: the release's config.json field set (values shrunk),
its generation_config.json, FP8 weights with block scales, and an MTP layer where the release has them.

Each `make_release(name, out)` returns `(path, oracle)`: `path` is the release-shaped checkpoint; `oracle` is
a directory transformers loads with its own classes for the same weights (the same directory, except for
Kimi-K2, whose model_type transformers does not ship: its oracle is the DeepSeek-V3 copy it is a clone of).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tests.hf_fixtures.fp8 import _read_checkpoint, quantize_fp8_block, write_sharded_safetensors
from tests.hf_fixtures.models import EOS_TOKEN_ID, make_hf_checkpoint

# Linear weights the DeepSeek-V3 / Kimi-K2 / MiniMax-M2 releases store in FP8 (not routers, norms, embeddings,
# the head or the correction bias).
_FP8_LINEAR_RE = re.compile(r"^model\.layers\.\d+\..*(_proj|_proj_with_mqa|\.w[123])\.weight$")

# The fields of each release's config.json beyond the ones the shrunk model sets (values as shipped).
RELEASE_FIELDS: dict[str, dict[str, Any]] = {
    "MiniMaxAI/MiniMax-M2": {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
            "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM",
        },
        "attn_type_list": None,  # one 1 per layer, filled in below
        "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_beta": 1.0,
        "max_model_len": None,
        "mtp_transformer_layers": 1,
        "num_mtp_modules": 3,
        "qk_norm_type": "per_layer",
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "use_mtp": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
    },
    "deepseek-ai/DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "ep_size": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "topk_method": "noaux_tc",
        "rope_theta": 10000,
        # YaRN as shipped (legacy key, "type"); original context shrunk with the model
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 16,
            "type": "yarn",
        },
        "max_position_embeddings": 64,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
    },
    "zai-org/GLM-4.5": {
        "architectures": ["Glm4MoeForCausalLM"],
        "num_nextn_predict_layers": 1,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
    },
}
GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "MiniMaxAI/MiniMax-M2": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 40},
    "deepseek-ai/DeepSeek-V3": {"do_sample": True, "temperature": 0.6, "top_p": 0.95},
    "zai-org/GLM-4.5": {},
}
RELEASES = (
    "MiniMaxAI/MiniMax-M2",
    "deepseek-ai/DeepSeek-V3",
    "moonshotai/Kimi-K2-Instruct",
    "zai-org/GLM-4.5",
)


def make_release(name: str, out_dir: str | Path, *, seed: int = 0, eos_token_id: int = EOS_TOKEN_ID):
    """(release-shaped checkpoint, oracle checkpoint for transformers) of `name` (one of RELEASES)."""
    out = Path(out_dir)
    if name == "moonshotai/Kimi-K2-Instruct":
        oracle, _ = make_release(
            "deepseek-ai/DeepSeek-V3", out / "deepseek-v3", seed=seed, eos_token_id=eos_token_id
        )
        path = out / "kimi-k2"
        shutil.copytree(oracle, path)
        _edit_config(path, lambda c: c.update(model_type="kimi_k2"))  # the rest is DeepSeek-V3's layout
        return path, oracle
    family = {"MiniMaxAI/MiniMax-M2": "minimax_m2", "deepseek-ai/DeepSeek-V3": "deepseek_v3"}.get(
        name, "glm4_moe"
    )
    fields = dict(RELEASE_FIELDS[name])
    overrides = {"rope_parameters": _rope_parameters(fields)} if "rope_scaling" in fields else {}
    if "max_position_embeddings" in fields:
        overrides["max_position_embeddings"] = fields["max_position_embeddings"]
    path = make_hf_checkpoint(
        family, out / family, seed=seed, max_shard_size="1GB", config_overrides=overrides
    )
    tensors = _read_checkpoint(path)
    num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    if fields.get("num_nextn_predict_layers"):
        tensors.update(_mtp_layer(tensors, num_layers, seed))
    fp8 = name != "zai-org/GLM-4.5"
    if fp8:
        tensors = _quantize(tensors, (16, 16))
    for old in path.glob("*.safetensors"):
        old.unlink()
    write_sharded_safetensors(tensors, path)

    def release_config(cfg: dict[str, Any]) -> None:
        rope = cfg.pop("rope_parameters", None) or {}  # releases write the flat, pre-v5 keys
        cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta"))
        cfg.update(fields)
        if cfg.get("attn_type_list", 0) is None:
            cfg["attn_type_list"] = [1] * num_layers
        if "rope_scaling" in fields and fields["rope_scaling"] is None:
            cfg["partial_rotary_factor"] = 0.5
        if name == "MiniMaxAI/MiniMax-M2":
            cfg.pop("eos_token_id", None)  # the release has it only in generation_config.json
        if fp8:
            cfg["quantization_config"] = {
                "activation_scheme": "dynamic",
                "fmt": "float8_e4m3fn" if family == "minimax_m2" else "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [16, 16],
            }

    _edit_config(path, release_config)
    generation = {"bos_token_id": 1, "eos_token_id": eos_token_id, **GENERATION_CONFIGS[name]}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path, path


def _rope_parameters(fields: dict[str, Any]) -> dict[str, Any]:
    legacy = dict(fields.get("rope_scaling") or {})
    rope_type = legacy.pop("type", legacy.pop("rope_type", "default"))
    return {"rope_type": rope_type, "rope_theta": float(fields["rope_theta"]), **legacy}


def _mtp_layer(tensors: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
    """A multi-token-prediction layer as DeepSeek-V3 / GLM-4.5 ship it: `model.layers.{n}.*` (a decoder
    layer shaped like the last one, plus enorm / hnorm / eh_proj / shared_head)."""
    g = torch.Generator().manual_seed(seed + 1000)
    last = f"model.layers.{n - 1}."
    out = {
        f"model.layers.{n}." + k[len(last) :]: torch.randn(t.shape, generator=g)
        for k, t in tensors.items()
        if k.startswith(last)
    }
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    out[f"model.layers.{n}.enorm.weight"] = torch.ones(hidden)
    out[f"model.layers.{n}.hnorm.weight"] = torch.ones(hidden)
    out[f"model.layers.{n}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
    out[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(hidden)
    out[f"model.layers.{n}.shared_head.head.weight"] = torch.randn(
        tensors["lm_head.weight"].shape, generator=g
    )
    return out


def _quantize(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        if _FP8_LINEAR_RE.search(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(tensors[name], block)
        else:
            out[name] = tensors[name]
    return out


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
