import pytest
import torch

from emoe.placement import Placement


@pytest.mark.parametrize("num_experts, num_groups", [(8, 1), (8, 2), (8, 3), (7, 4), (16, 5), (4, 4)])
def test_contiguous_is_balanced_and_complete(num_experts, num_groups):
    p = Placement.contiguous([1, 2], num_experts, num_groups)
    sizes = [len(g[1]) for g in p.groups]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == num_experts
    flat = [e for g in p.groups for e in g[2]]
    assert flat == list(range(num_experts))  # contiguous, in order
    group, slot = p.route_pairs(1, torch.arange(num_experts).unsqueeze(1))  # [E, 1]: one pair per expert
    for e in range(num_experts):
        assert p.groups[int(group[e, 0])][1][int(slot[e, 0])] == e


def test_json_round_trip_keeps_version_and_replicas():
    groups = ({0: (0, 1, 2)}, {0: (2, 3)})  # expert 2 replicated in both groups
    p = Placement(version=7, num_experts=4, groups=groups)
    q = Placement.from_json(p.to_json())
    assert q == p and q.version == 7
    group, _ = q.route_pairs(0, torch.tensor([[0], [1], [3]]))
    assert group.flatten().tolist() == [0, 0, 1]


def test_placement_without_every_expert_is_rejected():
    with pytest.raises(ValueError, match=r"no copy of experts \[3\]"):
        Placement(version=1, num_experts=4, groups=({0: (0, 1)}, {0: (2,)}))


def test_too_many_groups_is_rejected():
    with pytest.raises(ValueError, match="num_groups"):
        Placement.contiguous([0], 4, 5)
