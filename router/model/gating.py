"""Gating: router logits -> top-k expert ids and weights, one function per routing family.

Legend: T tokens, E experts, k experts per token, G expert groups of the DeepSeek router.
All scores are computed in float32, as the reference implementations do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emoe.spec import ROUTING_GROUPED, ROUTING_SIGMOID_BIAS, ROUTING_SOFTMAX, ROUTING_TOPK_SOFTMAX, ModelSpec


@dataclass(frozen=True)
class GateParams:
    top_k: int
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float


def softmax_topk(logits: torch.Tensor, bias: torch.Tensor | None, p: GateParams):
    probs = F.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, p.top_k, dim=-1)  # [T, k]
    if p.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def sigmoid_bias_topk(logits: torch.Tensor, bias: torch.Tensor | None, p: GateParams):
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + bias if bias is not None else scores
    _, ids = torch.topk(choice, p.top_k, dim=-1, sorted=False)  # [T, k]
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def grouped_sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor | None, p: GateParams):
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + bias if bias is not None else scores
    t, e = choice.shape
    per_group = choice.view(t, p.n_group, e // p.n_group)  # [T, G, E/G]
    group_scores = per_group.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_ids = torch.topk(group_scores, p.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)  # [T, G]
    keep = group_mask.bool().unsqueeze(-1).expand_as(per_group).reshape(t, e)  # [T, E]
    choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, p.top_k, dim=-1, sorted=False)[1]  # [T, k]
    weights = scores.gather(1, ids)
    if p.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * p.routed_scaling_factor


def topk_softmax(logits: torch.Tensor, bias: torch.Tensor | None, p: GateParams):
    """gpt-oss: top-k on the logits, then a softmax over the k chosen."""
    values, ids = torch.topk(logits.float(), p.top_k, dim=-1)  # [T, k]
    return ids, F.softmax(values, dim=-1)


GATES: dict[str, Callable] = {
    ROUTING_SOFTMAX: softmax_topk,
    ROUTING_TOPK_SOFTMAX: topk_softmax,
    ROUTING_SIGMOID_BIAS: sigmoid_bias_topk,
    ROUTING_GROUPED: grouped_sigmoid_topk,
}


class Gate:
    """The gate of one MoE layer: logits = x W^T (+ `logit_bias`), then the family's routing function
    (`bias`: the selection bias some routing functions add to their scores)."""

    def __init__(
        self,
        spec: ModelSpec,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ):
        self.weight = weight.float() if spec.routing == ROUTING_GROUPED else weight  # [E, H]
        self.bias = bias.float() if bias is not None else None  # [E]
        self.logit_bias = logit_bias.to(self.weight.dtype) if logit_bias is not None else None  # [E]
        self.fn = GATES[spec.routing]
        self.params = GateParams(
            spec.top_k, spec.norm_topk_prob, spec.n_group, spec.topk_group, spec.routed_scaling_factor
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, k] long, weights [T, k] float32)."""
        logits = F.linear(x.to(self.weight.dtype), self.weight, self.logit_bias)  # [T, E]
        return self.fn(logits, self.bias, self.params)
