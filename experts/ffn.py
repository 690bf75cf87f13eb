"""Σ_k w_k · FFN_{e_k}(x) over stacked expert weights.

Legend: n tokens, k experts per token, E local experts, H hidden size, I expert intermediate size.
`w_gate_up` is [E, 2I, H] (gate rows then up rows), `w_down` is [E, H, I]; FFN(x) = down(silu(gate x) * up x).
An expert id of -1 marks a (token, k) pair that belongs to another group: it contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn_grouped(
    x: torch.Tensor,  # [n, H]
    ids: torch.Tensor,  # [n, k] local expert ids, -1 = not here
    weights: torch.Tensor,  # [n, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [n, H]
    """Grouped compute: (token, k) pairs sorted by expert, one matmul pair per expert that has tokens."""
    n, k = ids.shape
    flat = ids.reshape(-1)  # [n*k]
    pairs = (flat >= 0).nonzero().squeeze(1)  # [P] positions of pairs routed here
    expert_of = flat[pairs]  # [P]
    expert_of, order = torch.sort(expert_of, stable=True)
    pairs = pairs[order]  # [P] sorted by expert
    token_of = pairs // k  # [P]
    counts = torch.bincount(expert_of, minlength=w_gate_up.shape[0]).tolist()
    xs = x.index_select(0, token_of)  # [P, H]
    ys = torch.empty_like(xs)  # [P, H]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        seg = xs[start : start + c]  # [c, H]
        gate, up = F.linear(seg, w_gate_up[e]).chunk(2, dim=-1)  # [c, I] each
        ys[start : start + c] = F.linear(F.silu(gate) * up, w_down[e])
        start += c
    ys *= weights.reshape(-1)[pairs].unsqueeze(1).to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def expert_ffn_reference(
    x: torch.Tensor,  # [n, H]
    ids: torch.Tensor,  # [n, k]
    weights: torch.Tensor,  # [n, k]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [n, H]
    """Dense oracle: gathers each pair's weights and runs one einsum. Memory O(n·k·I·H): tests only."""
    valid = ids >= 0  # [n, k]
    safe = ids.clamp(min=0)
    gu = torch.einsum("nh,nkoh->nko", x, w_gate_up[safe])  # [n, k, 2I]
    gate, up = gu.chunk(2, dim=-1)
    y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, w_down[safe])  # [n, k, H]
    w = (weights * valid).to(y.dtype).unsqueeze(-1)  # [n, k, 1]
    return (y * w).sum(dim=1)
