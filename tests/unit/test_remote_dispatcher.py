"""RemoteDispatcher with a fake transport: least outstanding work, failover, bounded wait for a replacement."""

from __future__ import annotations

import asyncio

import pytest
import torch

from emoe.placement import Placement
from router.remote import DispatchError, RemoteDispatcher, Transport, TransportError


class FakeSource:
    def __init__(self, entries):
        self.version, self.entries, self.reported = 1, list(entries), []

    def snapshot(self):
        return self.version, list(self.entries)

    def report_unreachable(self, replica_id):
        self.reported.append(replica_id)

    def add(self, entry):
        self.entries.append(entry)
        self.version += 1


def entry(rid, group):
    return {"replica_id": rid, "group": group}


def fake_transport(calls, dead=(), delay=0.0):
    async def connect(info):
        return info["replica_id"]

    async def call(conn, layer, version, x, ids, w, timeout_s):
        calls.append(conn)
        await asyncio.sleep(delay)
        if conn in dead:
            raise TransportError(f"{conn} is dead")
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
    assert d.stats.failovers == 1 and source.reported == ["a"]  # "a" was tried first, then "b"
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
