"""Attention over a flattened batch of sequence segments, with a KV cache per sequence.

Legend: T tokens in the step, n tokens of one segment, L cached + new positions of that sequence,
N query heads, Nkv key/value heads, D head dim. A step's tokens are laid out segment after segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emoe.spec import ModelSpec
from router.model.kv_cache import PagedDecode, SequenceCache
from router.model.layers import Linear, fused, rms_norm
from router.model.rope import Rope


@dataclass
class Segment:
    """`n` new tokens of one sequence, starting at `start` in the step, after `past` cached positions."""

    cache: SequenceCache
    start: int
    n: int
    past: int


class Segments(list):
    """A step's segments. `decode` is set when each is one new position of a paged cache (a decode step):
    attention then runs once over the whole batch instead of once per sequence."""

    decode: PagedDecode | None = None


def _mask(n: int, past: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal (and sliding-window) mask [n, L] with True = attend; None when every key is allowed."""
    if n == 1 and (window is None or past < window):
        return None
    q_pos = torch.arange(past, past + n, device=device).unsqueeze(1)  # [n, 1]
    k_pos = torch.arange(past + n, device=device).unsqueeze(0)  # [1, L]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """q [n, N, D], k [L, Nkv, D], v [L, Nkv, Dv] (, sinks [N]) -> [n, N * Dv]."""
    rep = q.shape[1] // k.shape[1]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [N, n, D], [Nkv, L, D]
    if rep > 1:
        kt, vt = kt.repeat_interleave(rep, dim=0), vt.repeat_interleave(rep, dim=0)
    if sinks is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)  # [N, n, Dv]
    else:  # SDPA has no sinks: scores, masked, softmax with the sink column
        scores = torch.matmul(qt, kt.transpose(1, 2)).float() * scale  # [N, n, L]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(_softmax_with_sinks(scores, sinks.view(-1, 1, 1)).to(vt.dtype), vt)
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """softmax over [scores, sink] along the last dim, the sink's share dropped: scores [..., L] float32,
    sinks broadcastable to [..., 1] -> probabilities [..., L] that sum to less than 1."""
    sink = sinks.float().expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def _sdpa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decode: PagedDecode,
    window: int | None,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, N, D]; k [B * Nkv, L, D], v [B * Nkv, L, Dv] (sequence-major, padded: `decode.valid`);
    sinks [N] or None -> [B, N * Dv]."""
    b, n, d = q.shape
    nkv, length, dv = k.shape[0] // b, k.shape[1], v.shape[2]
    if q.device.type != "cpu" and sinks is None:
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, N, 1, D]
            k.view(b, nkv, length, d),
            v.view(b, nkv, length, dv),
            attn_mask=decode.mask(window)[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )  # [B, N, 1, Dv]
        return out.reshape(b, -1)
    # CPU (and sinks): two batched matmuls over (sequence, kv head), each kv head's query heads as rows;
    # several times faster here than SDPA's kernels for a single query position
    bias = decode.attention_bias(nkv, q.dtype, window)  # [B * Nkv, 1, L], once per step
    scores = torch.baddbmm(bias, q.reshape(b * nkv, n // nkv, d), k.transpose(1, 2), alpha=scale).float()
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)  # [B * Nkv, rep, L]
    else:  # query head h = kv head * rep + r: sinks [N] -> [Nkv, rep, 1], the same for every sequence
        probs = _softmax_with_sinks(scores.view(b, nkv, n // nkv, length), sinks.view(nkv, n // nkv, 1))
    return torch.bmm(probs.reshape(b * nkv, n // nkv, length).to(v.dtype), v).reshape(b, n * dv)


def _per_segment(
    x: torch.Tensor,
    segments: list[Segment],
    window: int | None,
    fn: Callable[[Segment, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    outs = [fn(s, _mask(s.n, s.past, window, x.device)) for s in segments]
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


class GQAAttention:
    """Grouped-query attention with RoPE (optionally partial), optional qkv bias, q/k RMSNorm, this layer's
    sliding window and attention sinks."""

    def __init__(self, spec: ModelSpec, layer: int, get: Callable[..., torch.Tensor], rope: Rope):
        p = f"model.layers.{layer}.self_attn"
        opt = _optional(get)
        self.layer, self.spec, self.rope = layer, spec, rope
        wq, wk, wv, wo = (get(f"{p}.{n}_proj.weight") for n in "qkvo")
        bq, bk, bv = (opt(f"{p}.{n}_proj.bias", spec.qkv_bias) for n in "qkv")
        self.qkv = Linear(fused(wq, wk, wv), fused(bq, bk, bv))  # q, k and v in one projection
        self.qkv_sizes = (wq.shape[0], wk.shape[0], wv.shape[0])
        self.o = Linear(wo, opt(f"{p}.o_proj.bias", spec.o_bias))
        self.q_norm = opt(f"{p}.q_norm.weight", spec.qk_norm is not None)
        self.k_norm = opt(f"{p}.k_norm.weight", spec.qk_norm is not None)
        self.window = spec.window(layer)
        self.sinks = get(f"{p}.sinks", torch.float32) if spec.attention_sinks else None  # [N]

    def __call__(self, x: torch.Tensor, cos_sin, segments: Segments) -> torch.Tensor:
        s, t = self.spec, x.shape[0]
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        if s.qk_norm == "full":  # RMSNorm over the whole projection (MiniMax-M2)
            q, k = rms_norm(q, self.q_norm, s.rms_norm_eps), rms_norm(k, self.k_norm, s.rms_norm_eps)
        q = q.view(t, s.num_heads, s.head_dim)  # [T, N, D]
        k = k.view(t, s.num_kv_heads, s.head_dim)  # [T, Nkv, D]
        v = v.view(t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":  # RMSNorm per head (Qwen3)
            q, k = rms_norm(q, self.q_norm, s.rms_norm_eps), rms_norm(k, self.k_norm, s.rms_norm_eps)
        cos, sin = cos_sin
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)

        decode = segments.decode
        if decode is not None:  # one position per sequence: the whole batch at once
            kk, vv = decode.append_and_read(self.layer, k, v)  # [B * Nkv, L, D]
            out = _sdpa_decode(q, kk, vv, decode, self.window, s.attn_scale, self.sinks)
            return self.o(out)

        def one(seg: Segment, mask) -> torch.Tensor:
            sl = slice(seg.start, seg.start + seg.n)
            kk, vv = seg.cache.append(self.layer, k[sl], v[sl])
            return _sdpa(q[sl], kk, vv, mask, s.attn_scale, self.sinks)

        out = _per_segment(x, segments, self.window, one)  # [T, N * D]
        return self.o(out)


MLA_LATENT_NORM_EPS = 1e-6  # transformers' DeepSeek-V3 latent norms use their default, not rms_norm_eps


class MLAAttention:
    """DeepSeek multi-head latent attention: the cache holds the compressed latent and the rotary key."""

    def __init__(self, spec: ModelSpec, layer: int, get: Callable[..., torch.Tensor], rope: Rope):
        p = f"model.layers.{layer}.self_attn"
        opt = _optional(get)
        self.layer, self.spec, self.rope = layer, spec, rope
        lora = spec.q_lora_rank is not None
        self.wq = opt(f"{p}.q_proj.weight", not lora)
        self.wq_a = opt(f"{p}.q_a_proj.weight", lora)
        self.bq_a = opt(f"{p}.q_a_proj.bias", lora and spec.qkv_bias)
        self.q_a_norm = opt(f"{p}.q_a_layernorm.weight", lora)
        self.wq_b = opt(f"{p}.q_b_proj.weight", lora)
        self.wkv_a = get(f"{p}.kv_a_proj_with_mqa.weight")
        self.bkv_a = opt(f"{p}.kv_a_proj_with_mqa.bias", spec.qkv_bias)
        self.kv_a_norm = get(f"{p}.kv_a_layernorm.weight")
        self.wkv_b = get(f"{p}.kv_b_proj.weight")
        self.wo, self.bo = get(f"{p}.o_proj.weight"), opt(f"{p}.o_proj.bias", spec.o_bias)

    def __call__(self, x: torch.Tensor, cos_sin, segments: Segments) -> torch.Tensor:
        s, t = self.spec, x.shape[0]
        nope, rdim, r = s.qk_nope_head_dim, s.qk_rope_head_dim, s.kv_lora_rank
        if self.wq is not None:
            q = F.linear(x, self.wq)
        else:
            qa = rms_norm(F.linear(x, self.wq_a, self.bq_a), self.q_a_norm, MLA_LATENT_NORM_EPS)
            q = F.linear(qa, self.wq_b)
        q = q.view(t, s.num_heads, nope + rdim)  # [T, N, nope + R]
        ckv = F.linear(x, self.wkv_a, self.bkv_a)  # [T, r + R]
        latent = rms_norm(ckv[:, :r], self.kv_a_norm, MLA_LATENT_NORM_EPS)  # [T, r]
        k_rot = ckv[:, r:].unsqueeze(1)  # [T, 1, R]
        cos, sin = cos_sin
        q_rot, k_rot = self.rope.apply(q[..., nope:], cos, sin), self.rope.apply(k_rot, cos, sin)
        q = torch.cat([q[..., :nope], q_rot], dim=-1)

        def one(seg: Segment, mask) -> torch.Tensor:
            sl = slice(seg.start, seg.start + seg.n)
            lat, kr = seg.cache.append(self.layer, latent[sl], k_rot[sl, 0])  # [L, r], [L, R]
            kv = F.linear(lat, self.wkv_b).view(lat.shape[0], s.num_heads, nope + s.v_head_dim)
            k_nope, v = kv[..., :nope], kv[..., nope:]
            k = torch.cat([k_nope, kr.unsqueeze(1).expand(-1, s.num_heads, -1)], dim=-1)  # [L, N, nope + R]
            return _sdpa(q[sl], k, v, mask, s.attn_scale)

        out = _per_segment(x, segments, None, one)  # [T, N * Dv]
        return F.linear(out, self.wo, self.bo)


def _optional(get: Callable[[str], torch.Tensor]) -> Callable[[str, bool], torch.Tensor | None]:
    return lambda name, present: get(name) if present else None
