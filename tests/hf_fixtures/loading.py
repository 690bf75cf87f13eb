"""Loading a checkpoint with transformers (the oracle), FP8 ones included."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.hf_fixtures.fp8 import _read_checkpoint, dequantize_fp8_block, write_sharded_safetensors


def load_hf_model(path: str | Path):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=float32, attn_implementation='eager').eval()``.

    FP8 (``quant_method: fp8``) checkpoints come back as a plain fp32 model with dequantized weights:
    transformers dequantizes them at load time (``FineGrainedFP8Config(dequantize=True)``, which it also picks
    by itself on a machine without CUDA). Two transformers 5.24 limitations matter here:

    * the FP8 quantizer refuses to run without ``accelerate`` (a test dependency for that reason);
    * its load-time dequantization rejects weights whose shape is not a multiple of the block size (partial edge
      blocks, e.g. ``block=(24, 24)`` here): such checkpoints are dequantized here with
      :func:`dequantize_fp8_block` into a temporary fp32 copy, which is then loaded.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="eager")
    qc = _fp8_quantization_config(path)
    if qc is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    block = tuple(int(b) for b in qc.get("weight_block_size") or (128, 128))
    if _fp8_has_partial_blocks(path, block):
        with tempfile.TemporaryDirectory(prefix="emoe-fp8-deq-") as tmp:
            _write_dequantized_copy(path, Path(tmp), block)
            return AutoModelForCausalLM.from_pretrained(tmp, **kwargs).eval()

    from transformers import FineGrainedFP8Config

    kwargs["quantization_config"] = FineGrainedFP8Config(
        activation_scheme=qc.get("activation_scheme", "dynamic"), weight_block_size=block, dequantize=True
    )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _fp8_quantization_config(path: Path) -> dict | None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or None
    return qc if qc and qc.get("quant_method") == "fp8" else None


def _fp8_has_partial_blocks(path: Path, block: tuple[int, int]) -> bool:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):  # a weight and its scale may sit in different shards
        with safe_open(str(f), "pt") as so:
            shapes.update({name: so.get_slice(name).get_shape() for name in so.keys()})
    for name in shapes:
        if name.endswith("_scale_inv"):
            rows, cols = shapes[name.removesuffix("_scale_inv")][-2:]
            if rows % block[0] or cols % block[1]:
                return True
    return False


def _write_dequantized_copy(src: Path, dst: Path, block: tuple[int, int]) -> None:
    tensors = _read_checkpoint(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = t if scale is None else dequantize_fp8_block(t, scale, block)
    write_sharded_safetensors(out, dst, max_shard_bytes=1 << 40)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
