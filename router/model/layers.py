"""Small pieces of the dense half: RMSNorm, RoPE, the gated MLP.

Legend: T tokens, H hidden, N heads, D head dim, R rotary dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.ffn import packing_supported


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, scaled in the input dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class Linear:
    """y = x W^T + b. On CPU in bfloat16 the weight is re-laid out once for oneDNN (packed), which runs
    2-3x faster at decode batch sizes than the plain kernel on the same bytes; elsewhere `F.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.packed = None
        self.weight: torch.Tensor | None = weight
        if packing_supported(weight.dtype, weight.device):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)
            self.weight = None  # the packed copy is the one used

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def fused(*weights: torch.Tensor | None) -> torch.Tensor | None:
    """Rows of several projections of the same input as one weight (or bias); None if any is None."""
    return None if any(w is None for w in weights) else torch.cat(weights, dim=0)


class Rope:
    """Rotary embedding over the first `rotary_dim` dims of each head (partial RoPE when < head dim)."""

    def __init__(self, rotary_dim: int, theta: float, *, interleave: bool = False, device=None):
        self.rotary_dim = rotary_dim
        self.interleave = interleave
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
        self.inv_freq = (1.0 / (theta**exponent)).to(device)  # [R/2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, N, D]; cos, sin [T, R]."""
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, R]
        if self.interleave:
            # pairs (x0, x1), (x2, x3)... each rotated by one frequency; output de-interleaved
            c, s = cos[..., : r // 2], sin[..., : r // 2]
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        else:
            half = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
            rot = rot * cos + half * sin
        return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot
