"""MXFP4 experts as the gpt-oss releases ship them, and loading such a checkpoint with transformers.

The releases store each layer's expert weights as `<name>_blocks` [E, out, in/32, 16] uint8 (two FP4 E2M1
codes per byte, the low nibble first) and `<name>_scales` [E, out, in/32] uint8 (a power of two per 32
values, biased by 127), `<name>` being `gate_up_proj` ([E, H, 2I] unquantized, so out = 2I) or `down_proj`
([E, I, H], out = H). Everything else (attention, router, biases, norms, embeddings) stays unquantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.hf_fixtures.fp8 import source_checkpoint, write_sharded_safetensors

FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
MXFP4_QUANTIZED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# the release's list (openai/gpt-oss-20b config.json)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8): per 32
    values the smallest power of two that brings their largest magnitude to <= 6, each value rounded to the
    nearest FP4 E2M1 code."""
    groups = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)  # [..., G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., G]
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    scaled = groups / torch.exp2(exp).unsqueeze(-1)
    code = (scaled.abs().unsqueeze(-1) - FP4_MAGNITUDES).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    code = code | ((scaled < 0).long() << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)  # [..., G, 16]
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def make_mxfp4_gpt_oss_checkpoint(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 128) -> Path:
    """The tiny gpt_oss checkpoint of `make_hf_checkpoint`, its expert weights MXFP4-quantized the way the
    release stores them (`quantization_config: {"quant_method": "mxfp4", ...}` in config.json)."""
    out = Path(out_dir)
    tensors, config = source_checkpoint("gpt_oss", out, seed=seed, vocab_size=vocab_size)
    stored: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        if name.endswith(MXFP4_QUANTIZED):  # [E, in, out] -> stored [E, out, in], blocked along in
            blocks, scales = quantize_mxfp4(tensors[name].transpose(1, 2))
            stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
        else:
            stored[name] = tensors[name]
    write_sharded_safetensors(stored, out)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_hf_mxfp4_model(path: str | Path):
    """transformers' own load of an MXFP4 checkpoint, dequantized into a float32 model (eager attention)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=Mxfp4Config(dequantize=True),
    ).eval()
