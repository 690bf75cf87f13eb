"""FP8 block quantization as the MiniMax-M2 release ships it, and sharded safetensors writing."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from tests.hf_fixtures.models import make_hf_checkpoint

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Hub-layout names of the MiniMax-M2 weights that ship in FP8.
_FP8_MINIMAX_RE = re.compile(
    r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$|\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight$"
)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization as DeepSeek-V3 / MiniMax-M2 ship it.

    Returns ``(fp8 [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)])`` with
    ``scale_inv = amax(|block|) / 448`` and ``fp8 = (w / scale_inv).to(float8_e4m3fn)``.
    """
    b0, b1 = block
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    sr, sc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(sr * b0, sc * b1, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(sr, b0, sc, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    fp8 = q.reshape(sr * b0, sc * b1)[:rows, :cols].contiguous().to(torch.float8_e4m3fn)
    return fp8, scale_inv.contiguous()


def dequantize_fp8_block(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``fp8.float() * scale_inv`` broadcast per ``block`` (partial edge blocks allowed)."""
    b0, b1 = block
    rows, cols = fp8.shape
    s = scale_inv.to(torch.float32).repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return fp8.to(torch.float32) * s


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def source_checkpoint(family: str, out: Path, *, seed: int, vocab_size: int) -> tuple[dict, dict]:
    """(tensors, config) of a fresh `family` checkpoint, its generation_config.json copied into `out`:
    the start of a quantized fixture."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"emoe-{family}-src-") as tmp:
        src = make_hf_checkpoint(family, tmp, seed=seed, vocab_size=vocab_size, max_shard_size="1GB")
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
        return _read_checkpoint(src), json.loads((src / "config.json").read_text())


def write_sharded_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: str | Path, *, max_shard_bytes: int = 40_000
) -> list[str]:
    """Writes ``tensors`` as ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (greedy packing in key order, like save_pretrained). Returns the shard file names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def make_fp8_minimax_checkpoint(
    out_dir: str | Path, *, seed: int = 0, block: tuple[int, int] = (16, 16), vocab_size: int = 128
) -> Path:
    """A tiny minimax_m2 checkpoint whose attention q/k/v/o and expert w1/w2/w3 weights are stored as
    ``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` ([ceil(out/b0), ceil(in/b1)]), block-quantized like the
    released MiniMax-M2 / DeepSeek-V3 checkpoints. Everything else (embeddings, lm_head, norms, router gate,
    e_score_correction_bias) stays fp32. config.json carries the hub-style ``quantization_config``.

    With the default ``block=(16, 16)`` every quantized dimension (hidden 48, q/o 64, k/v 32, expert 32) is a
    multiple of the block, and :func:`load_hf_model` goes through transformers' own dequantization. Other block
    sizes (e.g. ``(24, 24)``) give partial edge blocks, as the hub's DeepSeek-V3 ``kv_a_proj_with_mqa`` (576 rows)
    has; transformers 5.24 cannot dequantize those, so :func:`load_hf_model` dequantizes them itself.
    """
    b0, b1 = int(block[0]), int(block[1])
    out = Path(out_dir)
    tensors, config = source_checkpoint("minimax_m2", out, seed=seed, vocab_size=vocab_size)

    quantized: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        w = tensors[name]
        if _FP8_MINIMAX_RE.search(name):
            fp8, scale_inv = quantize_fp8_block(w, (b0, b1))
            quantized[name] = fp8
            quantized[name + "_scale_inv"] = scale_inv
        else:
            quantized[name] = w
    for old in out.glob("*.safetensors"):
        old.unlink()
    write_sharded_safetensors(quantized, out)

    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [b0, b1],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
