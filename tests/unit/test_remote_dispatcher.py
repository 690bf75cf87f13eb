"""RemoteDispatcher with a fake transport: least outstanding work, failover, bounded wait for a replacement."""

from __future__ import annotations

import asyncio

import pytest
import torch

from emoe.placement import Placement
from router.dispatch import DispatchError, EndpointSource, RemoteDispatcher, Transport, TransportError


class FakeSource(EndpointSource):
    """The whole EndpointSource protocol, in memory."""

    def __init__(self, entries, placement_json=None):
        self.version, self.entries, self.reported = 1, list(entries), []
        self.placement_json, self.loads, self.closed = placement_json, {}, False

    def snapshot(self):
        return self.version, list(self.entries)

    def active_placement(self):
        return self.placement_json

    def report_unreachable(self, replica_id):
        self.reported.append(replica_id)

    def publish_load(self, router_id, loads):
        self.loads[router_id] = loads

    def close(self):
        self.closed = True

    def add(self, entry):
        self.entries.append(entry)
        self.version += 1


def entry(rid, group):
    return {"replica_id": rid, "group": group}


def fake_transport(calls, dead=(), delay=0.0, timed_out=()):
    async def connect(info):
        return info["replica_id"]

    async def call(conn, layer, version, x, ids, w):
        calls.append(conn)
        await asyncio.sleep(delay)
        if conn in dead:
            raise TransportError(f"{conn} is dead")
        if conn in timed_out:  # what asyncio.wait_for raises; not the built-in TimeoutError on Python 3.10
            raise asyncio.TimeoutError()
        return x * (ids >= 0).sum(1, keepdim=True)  # each pair held here contributes x

    return Transport("fake", connect, call, lambda conn: None)


def inputs():
    ids = torch.tensor([[0, 3], [1, 2], [3, 3]])
    return torch.ones(3, 4), ids, torch.ones(3, 2)


def test_failed_call_is_retried_on_another_replica():
    calls = []
    source = FakeSource([entry("a", 0), entry("b", 0), entry("c", 1)])
    placement = Placement.contiguous([0], 4, 2)
    d = RemoteDispatcher(fake_transport(calls, dead={"a"}), source, placement, torch.float32)
    out = asyncio.run(d.forward(0, *inputs()))
    torch.testing.assert_close(out, torch.full((3, 4), 2.0))  # both pairs of every token served once
    assert d.stats()["failovers"] == 1 and source.reported == ["a"]  # "a" was tried first, then "b"
    out = asyncio.run(d.forward(0, *inputs()))  # "a" is cooling down: only "b" serves group 0
    assert calls[-2:].count("a") == 0


def test_least_outstanding_replica_is_picked():
    calls = []
    source = FakeSource([entry("a", 0), entry("b", 0)])
    d = RemoteDispatcher(
        fake_transport(calls, delay=0.05), source, Placement.contiguous([0], 4, 1), torch.float32
    )

    async def two_at_once():
        await asyncio.gather(d.forward(0, *inputs()), d.forward(0, *inputs()))

    asyncio.run(two_at_once())
    assert sorted(calls) == ["a", "b"]  # the second call went to the idle replica


def test_waits_for_a_replacement_then_gives_up():
    calls = []
    source = FakeSource([entry("a", 0)])
    d = RemoteDispatcher(
        fake_transport(calls, dead={"a"}),
        source,
        Placement.contiguous([0], 4, 1),
        torch.float32,
        replacement_wait_s=0.5,
    )

    async def replaced():
        task = asyncio.create_task(d.forward(0, *inputs()))
        await asyncio.sleep(0.2)
        source.add(entry("a2", 0))  # the restarted replica registers
        return await task

    torch.testing.assert_close(asyncio.run(replaced()), torch.full((3, 4), 2.0))
    source.entries = [entry("a", 0)]
    source.version += 1
    d2 = RemoteDispatcher(
        fake_transport([], dead={"a"}),
        source,
        Placement.contiguous([0], 4, 1),
        torch.float32,
        replacement_wait_s=0.3,
    )
    with pytest.raises(DispatchError, match="no healthy replica of expert group 0"):
        asyncio.run(d2.forward(0, *inputs()))


def test_a_timed_out_call_fails_over():
    """Issue 13, bug 1: a transport's asyncio.TimeoutError marks that replica failed and moves on."""
    calls = []
    source = FakeSource([entry("a", 0), entry("b", 0), entry("c", 1)])
    d = RemoteDispatcher(
        fake_transport(calls, timed_out={"a"}), source, Placement.contiguous([0], 4, 2), torch.float32
    )
    torch.testing.assert_close(asyncio.run(d.forward(0, *inputs())), torch.full((3, 4), 2.0))
    assert d.stats()["failovers"] == 1 and source.reported == ["a"]


def test_begin_step_switches_to_a_newer_placement_and_stats_report_it():
    old = Placement.contiguous([0], 4, 2)
    new = Placement(old.version + 1, 4, ({0: (0, 1, 2)}, {0: (3,)}))
    source = FakeSource([entry("a", 0), entry("c", 1)])
    d = RemoteDispatcher(fake_transport([]), source, old, torch.float32)
    d.begin_step()
    assert d.placement is old  # nothing newer yet
    source.placement_json = new.to_json()
    d.begin_step()
    assert d.placement == new and d.stats()["placement_version"] == new.version
    d.close()
    assert source.closed
