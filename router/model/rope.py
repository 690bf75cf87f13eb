"""Rotary position embedding with the scalings releases use: default, linear, dynamic NTK, YaRN, Llama 3.

One function per `rope_type` computes the inverse frequencies, chosen once; `dynamic` scales each sequence
by its own length once it passes max_position_embeddings (as transformers does for a batch of one). Legend: R rotary dims,
T tokens, N heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from emoe.rope import RopeScaling


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [R/2]


def default_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int) -> torch.Tensor:
    return 1.0 / theta ** _exponents(dim)


def linear_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int) -> torch.Tensor:
    return default_inv_freq(dim, theta, s, max_pos) / s.factor


def ntk_base(theta: float, factor: float, seq_len, max_pos: int, dim: int):
    """Dynamic NTK: past the trained context the base grows with the sequence length (a number or [T, 1])."""
    return theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))


def dynamic_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int, seq_len: int = 0) -> torch.Tensor:
    return 1.0 / ntk_base(theta, s.factor, max(seq_len, max_pos), max_pos, dim) ** _exponents(dim)


def yarn_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int) -> torch.Tensor:
    """Blend of interpolated (low frequencies) and extrapolated (high) frequencies over a linear ramp
    between the dims that rotate beta_fast and beta_slow times within the original context."""
    original = s.original_max_position_embeddings or max_pos

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [R/2]
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def llama3_inv_freq(dim: int, theta: float, s: RopeScaling, max_pos: int) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    inv_freq = default_inv_freq(dim, theta, s, max_pos)
    old = s.original_max_position_embeddings or max_pos
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


INV_FREQ: dict[str, Callable[..., torch.Tensor]] = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "dynamic": dynamic_inv_freq,
    "yarn": yarn_inv_freq,
    "llama3": llama3_inv_freq,
}


class Rope:
    """Rotary embedding over the first `rotary_dim` dims of each head (partial RoPE when < head dim)."""

    def __init__(
        self,
        rotary_dim: int,
        theta: float,
        *,
        scaling: RopeScaling | None = None,
        max_position_embeddings: int = 4096,
        interleave: bool = False,
        device=None,
    ):
        scaling = scaling or RopeScaling()
        if scaling.type not in INV_FREQ:
            raise ValueError(f"unknown rope_type {scaling.type!r}; choices: {', '.join(INV_FREQ)}")
        self.rotary_dim, self.theta, self.scaling = rotary_dim, theta, scaling
        self.max_pos, self.interleave, self.device = max_position_embeddings, interleave, device
        self.inv_freq = INV_FREQ[scaling.type](rotary_dim, theta, scaling, max_position_embeddings).to(device)
        self.attention_factor = scaling.yarn_attention_factor()

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_ends: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, R] of positions [T]. `seq_ends` [T]: the length of each token's sequence after this
        step, which `dynamic` scales by (each sequence on its own, independent of what it is batched with)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [T, R/2]
        if self.scaling.type == "dynamic" and seq_ends is not None and bool((seq_ends > self.max_pos).any()):
            length = seq_ends.float().clamp(min=self.max_pos).unsqueeze(-1)  # [T, 1]
            base = ntk_base(self.theta, self.scaling.factor, length, self.max_pos, self.rotary_dim)  # [T, 1]
            freqs = positions.float().unsqueeze(-1) / base ** _exponents(self.rotary_dim).to(base.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

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
