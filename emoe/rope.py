"""RoPE settings of a checkpoint: base, rotated fraction, and the scaling (`rope_type`) the release uses.

Read from transformers v5 `rope_parameters` or the hub's older `rope_scaling` + `rope_theta` keys. The
frequency math lives with the model (`router/model/rope.py`); this module only knows the config keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class UnsupportedRope(ValueError):
    """A rope_type this project does not implement (named in the message)."""


@dataclass(frozen=True)
class RopeScaling:
    """How positions are scaled. `factor` is the context extension; the others apply per type:
    yarn (original_max_position_embeddings, beta_fast/slow, mscale, mscale_all_dim, attention_factor,
    truncate), llama3 (original_max_position_embeddings, low/high_freq_factor), dynamic (the model's
    max_position_embeddings is where scaling starts)."""

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    truncate: bool = True

    def yarn_attention_factor(self) -> float:
        """The factor YaRN multiplies cos and sin by (1.0 for every other type)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def mla_softmax_scale(self) -> float:
        """DeepSeek-V3's extra softmax scale under a scaled RoPE: mscale(factor, mscale_all_dim) squared."""
        if self.type == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    @property
    def context_factor(self) -> float:
        """How far the scaling extends the trained context (1.0 for default / dynamic)."""
        return self.factor if self.type in ("linear", "yarn", "llama3") else 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parse_rope(cfg: dict[str, Any]) -> tuple[float, float | None, RopeScaling]:
    """(theta, partial_rotary_factor or None, scaling) of a config.json."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedRope(
            f"unsupported setting rope_type={rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    theta = merged.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError(f"config.json ({cfg.get('model_type')}): missing required key 'rope_theta'")
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    return float(theta), partial, _scaling(rope_type, merged, cfg)


def _scaling(rope_type: str, p: dict[str, Any], cfg: dict[str, Any]) -> RopeScaling:
    if rope_type == "default":
        return RopeScaling()
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    # a top-level original_max_position_embeddings wins over the rope dict's (as transformers reads it)
    original = cfg.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
    factor = p.get("factor")
    if factor is None and rope_type == "yarn" and original:
        factor = max_pos / original
    if factor is None:
        raise ValueError(f"config.json ({cfg.get('model_type')}): rope_type={rope_type!r} needs 'factor'")

    def opt(key: str, default: Any) -> Any:
        return default if p.get(key) is None else p[key]

    return RopeScaling(
        type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(original or max_pos)
        if rope_type in ("yarn", "llama3")
        else None,
        beta_fast=float(opt("beta_fast", 32.0)),
        beta_slow=float(opt("beta_slow", 1.0)),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        attention_factor=p.get("attention_factor"),
        low_freq_factor=float(opt("low_freq_factor", 1.0)),
        high_freq_factor=float(opt("high_freq_factor", 4.0)),
        truncate=bool(opt("truncate", True)),
    )
