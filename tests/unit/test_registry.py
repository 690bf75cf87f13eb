"""The registry as a plain class: endpoints, load report, re-placement activation and its trigger."""

from __future__ import annotations

import asyncio

from cluster.registry import Registry
from emoe.placement import Placement

P0 = Placement.contiguous([0, 1], 8, 2)


def entry(rid: str, group: int, versions=(0,)) -> dict:
    return {
        "replica_id": rid,
        "actor_id": rid,
        "group": group,
        "placement_versions": versions,
        "grpc_endpoint": "127.0.0.1:1",
    }


def skewed(layer_count: int = 2) -> dict[int, list[float]]:
    return {layer: [50.0, 50.0, 0, 0, 0, 0, 0, 0] for layer in range(layer_count)}


def test_restarted_actor_replaces_its_entry_and_versions_move():
    async def run():
        r = Registry(P0.to_json())
        await r.register(entry("a", 0))
        restarted = {**entry("a2", 0), "actor_id": "a"}
        await r.register(restarted)
        version, entries = await r.snapshot()
        return version, [e["replica_id"] for e in entries]

    assert asyncio.run(run()) == (2, ["a2"])


def test_replace_activates_once_every_group_serves_the_new_version():
    async def run():
        r = Registry(P0.to_json())
        await r.register(entry("a", 0))
        await r.register(entry("b", 1))
        await r.publish_load("router", skewed())
        report = await r.load_report()
        assert report["imbalance"] == 2.0 and report["group_loads"] == {0: 200.0, 1: 0.0}
        event = await r.replace()
        assert event["imbalance_predicted"] <= 1.3 and r.replacement.pending is not None
        await r.register(entry("a", 0, (0, 1)))
        state = await r.placement_state()
        assert state["active_version"] == 0  # group 1 has no replica on v1 yet
        await r.register(entry("b", 1, (0, 1)))
        state = await r.placement_state()
        assert state["active_version"] == 1 and state["pending"] is None
        return (await r.load_report())["imbalance"]

    assert asyncio.run(run()) <= 1.3


def test_sustained_imbalance_triggers_a_replacement():
    async def run():
        r = Registry(P0.to_json(), replace_threshold=1.5, replace_after_s=0.0)
        await r.publish_load("router", skewed())  # starts the watcher
        for _ in range(40):
            if r.replacement.pending is not None:
                break
            await asyncio.sleep(0.1)
        r._watch.cancel()
        return r.replacement.pending

    pending = asyncio.run(run())
    assert pending is not None and pending.version == 1


def test_wait_for_change_returns_on_register():
    async def run():
        r = Registry(P0.to_json())
        waiter = asyncio.create_task(r.wait_for_change(0, timeout_s=5))
        await asyncio.sleep(0.05)
        await r.register(entry("a", 0))
        version, entries, placement = await waiter
        return version, len(entries), Placement.from_json(placement).version

    assert asyncio.run(run()) == (1, 1, 0)


def test_state_survives_a_restart(monkeypatch):
    store: dict[str, str] = {}
    monkeypatch.setattr("cluster.registry._kv_put", lambda k, v: store.__setitem__(k, v))
    monkeypatch.setattr("cluster.registry._kv_get", lambda k: store.get(k))

    async def run():
        r = Registry(P0.to_json(), state_key="k")
        await r.register(entry("a", 0))
        await r.register(entry("b", 1))
        await r.replace()
        await r.register(entry("a", 0, (0, 1)))
        await r.register(entry("b", 1, (0, 1)))
        await r.set_override(1, 3)
        before = r.version
        again = Registry(P0.to_json(), state_key="k")  # the replica restarted with the same arguments
        state = await again.placement_state()
        return before, again.version, state["active_version"], again.overrides

    before, after, version, overrides = asyncio.run(run())
    assert version == 1 and overrides == {1: 3} and after > before


def test_silent_replicas_expire():
    async def run():
        r = Registry(P0.to_json(), entry_ttl_s=0.2)
        await r.register(entry("a", 0))
        await r.register(entry("b", 1))
        await asyncio.sleep(0.3)
        await r.register(entry("b", 1))  # b keeps its heartbeat, a was killed
        _, entries = await r.snapshot()
        return [e["replica_id"] for e in entries]

    assert asyncio.run(run()) == ["b"]
