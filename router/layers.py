"""Small pieces of the dense half: RMSNorm, RoPE, the gated MLP.

Legend: T tokens, H hidden, N heads, D head dim, R rotary dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, scaled in the input dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x); x [T, H]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


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
