"""Prefix-aware routing policy: a prompt goes where its prefix went, unless that router is too busy."""

from __future__ import annotations

from cluster.prefix_routing import PrefixAffinity

SYSTEM = list(range(100, 164))  # 4 blocks


def test_a_conversation_sticks_to_the_router_that_holds_its_prefix():
    p = PrefixAffinity(imbalance=2)
    first = p.rank(["a", "b"], SYSTEM + [1] * 20)
    assert first == [["a"], ["b"]]  # nothing known: the least loaded (ties in candidate order)
    p.routed("a", SYSTEM + [1] * 20)
    p.completed("a")
    p.load["a"] = 1  # a is a little busier, within the imbalance: the longer history still goes to a
    assert p.rank(["a", "b"], SYSTEM + [1] * 20 + [7] * 40)[0] == ["a"]
    assert p.affinity_hits == 1


def test_the_longest_known_prefix_wins_and_an_overloaded_owner_is_skipped():
    p = PrefixAffinity(imbalance=2)
    p.routed("a", SYSTEM)
    p.routed("b", SYSTEM + [5] * 32)  # b holds the longer prefix of this session
    assert p.rank(["a", "b"], SYSTEM + [5] * 32 + [6] * 16)[0] == ["b"]
    assert p.rank(["a", "b"], SYSTEM + [9] * 32)[0] == ["b"]  # only the system prompt: b saw it last
    for _ in range(3):
        p.routed("b", [42] * 16)
    # b is 4 above a (> imbalance 2): the least loaded takes it, and b stays second
    assert p.rank(["a", "b"], SYSTEM + [5] * 32 + [6] * 16) == [["a"], ["b"]]


def test_a_dead_router_is_forgotten_and_short_prompts_go_to_the_least_loaded():
    p = PrefixAffinity()
    p.routed("a", SYSTEM)
    p.forget("a")
    assert p.rank(["b", "c"], SYSTEM)[0] == ["b"] and p.affinity_hits == 0
    p.routed("b", [1, 2, 3])  # shorter than a block: nothing to remember
    assert not p.owner
    assert p.rank(["b", "c"], [1, 2, 3]) == [["c"], ["b"]]
    assert p.rank([], SYSTEM) == []


def test_the_table_is_bounded():
    p = PrefixAffinity(max_entries=8)
    for i in range(5):
        p.routed("a", [i] * 64)  # 4 blocks each
    assert len(p.owner) == 8
