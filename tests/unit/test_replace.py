"""Re-placement: replicating hot experts and balancing groups; routing spreads pairs over copies."""

from __future__ import annotations

import torch

from emoe.placement import Placement
from emoe.replace import plan, plan_layer, predicted_group_loads
from experts.store import ExpertStore
from router.dispatch.local import LocalDispatcher


def imbalance(loads: list[float]) -> float:
    return max(loads) / (sum(loads) / len(loads))


def test_hot_experts_in_one_group_get_spread():
    current = Placement.contiguous([0, 1], 16, 4)
    loads = {layer: [100.0] * 4 + [1.0] * 12 for layer in (0, 1)}  # experts 0-3 hot, all in group 0
    before = imbalance(predicted_group_loads(current, loads))
    new = plan(loads, current)
    after = imbalance(predicted_group_loads(new, loads))
    assert before >= 2.5 and after <= 1.3, (before, after)
    assert new.version == current.version + 1


def test_a_single_very_hot_expert_is_replicated():
    held = plan_layer([1000.0] + [1.0] * 7, num_groups=4, slots_per_group=3)
    assert sum(0 in h for h in held) >= 3  # copies of expert 0 in several groups
    assert sorted({e for h in held for e in h}) == list(range(8))  # every expert still held
    assert all(len(h) <= 3 and len(set(h)) == len(h) for h in held)


def test_routing_over_copies_is_exact_and_even():
    g = torch.Generator().manual_seed(0)
    e, h, inter = 4, 8, 6
    w_gu, w_d = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    one = Placement.contiguous([0], e, 1)
    rep = Placement(1, e, ({0: (0, 1, 2)}, {0: (0, 3)}))  # expert 0 in both groups

    def dispatcher(p: Placement) -> LocalDispatcher:
        stores = [
            ExpertStore({0: ids[0]}, {0: w_gu[list(ids[0])]}, {0: w_d[list(ids[0])]})
            for ids in [(grp[0],) for grp in p.groups]
        ]
        return LocalDispatcher(stores, p)

    x = torch.randn(10, h, generator=g)
    ids = torch.zeros(10, 2, dtype=torch.long)
    ids[:, 1] = torch.randint(1, e, (10,), generator=g)
    w = torch.rand(10, 2, generator=g)
    import asyncio

    a = asyncio.run(dispatcher(one).forward(0, x, ids, w))
    b = asyncio.run(dispatcher(rep).forward(0, x, ids, w))
    torch.testing.assert_close(a, b)
    groups, _ = rep.route_pairs(0, ids)
    hits = groups[ids == 0]
    assert (hits == 0).sum() == (hits == 1).sum()  # expert 0's pairs split evenly over its 2 copies
