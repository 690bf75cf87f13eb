"""Dequantization of the weight formats releases ship: block-wise FP8 (DeepSeek-V3, MiniMax-M2) and MXFP4
(gpt-oss experts). Pure functions over tensors already read; the checkpoint reader calls them."""

from __future__ import annotations

import torch

from emoe.safetensors_file import CheckpointError
from emoe.spec import MXFP4_BLOCK, ceil_div

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# FP4 E2M1: the magnitudes of codes 0-7; code bit 3 is the sign
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MXFP4_SCALE_BIAS = 127  # a scale byte s means 2 ** (s - 127)


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, *, block: tuple[int, int] | None = None, name: str = "weight"
) -> torch.Tensor:
    """`w` [O, I] in FP8 times its per-block `scale_inv` [ceil(O/bo), ceil(I/bi)] -> float32 [O, I]."""
    out_dim, in_dim = w.shape
    so, si = scale_inv.shape
    bo, bi = block if block is not None else (ceil_div(out_dim, so), ceil_div(in_dim, si))
    if ceil_div(out_dim, bo) != so or ceil_div(in_dim, bi) != si:
        raise CheckpointError(
            f"tensor {name!r}: scale_inv shape {[so, si]} does not tile shape {[out_dim, in_dim]}"
        )
    scale = scale_inv.repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return w.float() * scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """MXFP4 -> float32: `blocks` [..., G, 16] uint8 (two FP4 E2M1 codes per byte, the low nibble first),
    `scales` [..., G] uint8 (one power-of-two exponent per 32 values) -> [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"tensor {name!r}: MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != MXFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"tensor {name!r}: MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}"
        )
    lut = torch.tensor(FP4_E2M1 + tuple(-v for v in FP4_E2M1), device=blocks.device)  # [16]
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32]
    values = lut[codes.int()]
    exponents = scales.int().sub_(MXFP4_SCALE_BIAS).unsqueeze(-1)  # [..., G, 1]
    return torch.ldexp(values, exponents).flatten(-2)
