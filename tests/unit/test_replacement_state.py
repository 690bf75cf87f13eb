"""The re-placement state machine as step tables: the imbalance trigger, activation, start, persistence."""

from __future__ import annotations

import pytest

from cluster.replacement import ReplacementState, group_loads, imbalance
from emoe.placement import Placement

P0 = Placement.contiguous([0, 1], 8, 2)
SKEWED = {layer: [50.0, 50.0, 0, 0, 0, 0, 0, 0] for layer in (0, 1)}


def entry(group: int, versions: tuple[int, ...]) -> dict:
    return {"replica_id": f"r{group}", "group": group, "placement_versions": versions}


# name -> (threshold, after_s, steps of (now_s, imbalance, should_replace))
TRIGGER = {
    "sustained, then the timer restarts": (
        1.5,
        10.0,
        [(0.0, 2.0, False), (5.0, 2.0, False), (10.0, 2.0, True), (11.0, 2.0, False), (21.0, 2.0, True)],
    ),
    "a balanced check resets the timer": (
        1.5,
        10.0,
        [(0.0, 2.0, False), (9.0, 1.2, False), (10.0, 2.0, False), (19.0, 2.0, False), (20.0, 2.0, True)],
    ),
    "at the threshold counts as balanced": (1.5, 0.0, [(0.0, 1.5, False), (1.0, 1.51, True)]),
    "after_s 0 triggers at once": (1.5, 0.0, [(3.0, 2.0, True)]),
    "no threshold never triggers": (None, 0.0, [(0.0, 100.0, False), (50.0, 100.0, False)]),
    "threshold 0 never triggers": (0.0, 0.0, [(0.0, 100.0, False)]),
}


@pytest.mark.parametrize("threshold, after_s, steps", TRIGGER.values(), ids=TRIGGER.keys())
def test_trigger(threshold, after_s, steps):
    state = ReplacementState(P0, threshold, after_s)
    got = [state.should_replace(value, now) for now, value, _ in steps]
    assert got == [want for _, _, want in steps]


def test_a_pending_replacement_holds_the_trigger():
    state = ReplacementState(P0, threshold=1.5, after_s=0.0)
    state.start(SKEWED, 2.0, now_s=0.0)
    assert [state.should_replace(2.0, t) for t in (0.0, 100.0)] == [False, False]
    state.activate_if_ready([entry(0, (1,)), entry(1, (1,))], now_s=1.0)
    assert state.should_replace(2.0, 101.0)


# entries registered at each step -> (active version, pending version, activated at this step)
ACTIVATION = [
    ([], (0, 1, False)),
    ([entry(0, (0, 1))], (0, 1, False)),
    ([entry(0, (0, 1)), entry(1, (0,))], (0, 1, False)),  # group 1 has no replica on v1 yet
    ([entry(0, (0, 1)), entry(1, (0, 1))], (1, None, True)),
    ([entry(0, (1,)), entry(1, (1,))], (1, None, False)),  # nothing pending: nothing to do
]


def test_activation_waits_for_every_group():
    state = ReplacementState(P0)
    event = state.start(SKEWED, 2.0, now_s=100.0)
    assert (event["at"], event["from_version"], event["to_version"]) == (100.0, 0, 1)
    for step, (entries, (active, pending, activated)) in enumerate(ACTIVATION):
        assert state.activate_if_ready(entries, now_s=200.0 + step) is activated, step
        assert (state.active.version, state.pending and state.pending.version) == (active, pending), step
    assert state.log == [{**event, "activated_at": 203.0}]


def test_start_plans_from_the_load_or_takes_the_given_placement():
    state = ReplacementState(P0)
    planned = state.start(SKEWED, 2.0, now_s=0.0)
    assert planned["imbalance_before"] == 2.0 and planned["imbalance_predicted"] <= 1.3
    assert imbalance(group_loads(state.pending, SKEWED)) == planned["imbalance_predicted"]
    given = Placement.contiguous([0, 1], 8, 2, version=41)
    state.start(SKEWED, 2.0, now_s=1.0, placement=given)  # replaces the pending one, numbered active + 1
    assert state.pending.version == 1 and state.pending.groups == given.groups and len(state.log) == 2
    with pytest.raises(ValueError, match="no placement"):
        ReplacementState(None).start(SKEWED, 2.0, now_s=0.0)


def test_durable_state_round_trips():
    state = ReplacementState(P0)
    state.start(SKEWED, 2.0, now_s=0.0)
    state.activate_if_ready([entry(0, (1,)), entry(1, (1,))], now_s=1.0)
    state.start(SKEWED, 1.0, now_s=2.0)
    again = ReplacementState(P0)
    again.restore(state.to_dict())
    assert again.describe() == state.describe() and again.log == state.log
    assert (again.active.version, again.pending.version) == (1, 2)


@pytest.mark.parametrize(
    "loads, want",
    [({}, 0.0), ({0: 0.0, 1: 0.0}, 0.0), ({0: 10.0, 1: 10.0}, 1.0), ({0: 30.0, 1: 10.0}, 1.5)],
)
def test_imbalance(loads, want):
    assert imbalance(loads) == want
