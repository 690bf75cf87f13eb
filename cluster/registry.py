"""Registry: where expert-group replicas announce their data-plane endpoints and routers learn of them.

`Registry` is a plain class run as a Ray actor (engine mode) or as the singleton Serve deployment
"Registry" (served mode). Replicas `register` once they can serve and `deregister` on shutdown; a restarted
replica registers again under the same actor id and replaces its old entry. Routers long-poll
`wait_for_change(version)` through a `RegistryClient` (cluster/registry_client.py), so additions and
removals reach them while running. A router that cannot reach a replica reports it; the registry asks the
replica's gRPC `Info` and drops the entry unless the same replica answers. Live re-placement is the
`ReplacementState` machine (cluster/replacement.py); the registry feeds it loads, entries and the time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from cluster.replacement import ReplacementState, group_loads, imbalance
from emoe.placement import Placement

log = logging.getLogger(__name__)


class Registry:
    def __init__(
        self,
        placement_json: str | None = None,
        load_ttl_s: float = 10.0,
        replace_threshold: float | None = None,
        replace_after_s: float = 10.0,
        state_key: str | None = None,
        entry_ttl_s: float = 15.0,
    ):
        self.version = 0
        self.entry_ttl_s = entry_ttl_s
        self.last_seen: dict[
            str, float
        ] = {}  # replica_id -> last register (replicas re-register every second)
        placement = Placement.from_json(placement_json) if placement_json else None
        self.replacement = ReplacementState(placement, replace_threshold, replace_after_s)
        self._watch: asyncio.Task | None = None
        self.overrides: dict[int, int] = {}  # group -> replicas an operator asked for
        self.state_key = state_key
        self.entries: dict[str, dict[str, Any]] = {}  # replica_id -> info
        self._changed = asyncio.Event()
        self.router_loads: dict[str, tuple[float, dict[int, list[float]]]] = {}  # router -> (time, loads)
        self.router_stats_: dict[str, tuple[float, dict[str, Any]]] = {}  # router -> (time, its stats)
        self.load_ttl_s = load_ttl_s
        self._restore()

    async def publish_load(self, router_id: str, loads: dict[int, list[float]]) -> None:
        """A router's tokens/s per (layer, expert) over its window: {layer: [tokens/s of expert e]}."""
        self.router_loads[router_id] = (time.monotonic(), {int(k): v for k, v in loads.items()})
        if self.replacement.threshold and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_imbalance())

    async def publish_router_stats(self, router_id: str, stats: dict[str, Any]) -> None:
        """A Router replica's engine and dispatcher stats (every second)."""
        self.router_stats_[router_id] = (time.monotonic(), stats)

    async def router_stats(self) -> dict[str, dict[str, Any]]:
        """The latest stats of every router heard from within the load TTL (a dead one drops out)."""
        now = time.monotonic()
        for rid in [r for r, (t, _) in self.router_stats_.items() if now - t > self.load_ttl_s]:
            del self.router_stats_[rid]
        return {rid: st for rid, (_, st) in self.router_stats_.items()}

    async def load_report(self) -> dict[str, Any]:
        """Expert loads summed over live routers, group loads under the current placement, imbalance."""
        now = time.monotonic()
        experts: dict[int, list[float]] = {}
        for t, loads in self.router_loads.values():
            if now - t > self.load_ttl_s:
                continue
            for layer, row in loads.items():
                acc = experts.setdefault(layer, [0.0] * len(row))
                experts[layer] = [a + b for a, b in zip(acc, row, strict=True)]
        active = self.replacement.active
        groups = group_loads(active, experts) if active else {}
        return {
            "expert_loads": experts,
            "group_loads": groups,
            "imbalance": imbalance(groups),
            "overrides": dict(self.overrides),
        }

    async def set_override(self, group: int, replicas: int | None) -> dict[int, int]:
        """Admin: pin a group's replica count (the autoscaling policy follows it); None releases it."""
        if replicas is None:
            self.overrides.pop(group, None)
        else:
            if replicas < 0:
                raise ValueError("replicas must be >= 0")
            self.overrides[group] = replicas
        self._persist()
        return dict(self.overrides)

    async def replacements_log(self) -> list[dict[str, Any]]:
        return list(self.replacement.log)

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        self._persist()

    # ---- durable state: placement versions, re-placements, pins survive a registry restart -----------
    def _restore(self) -> None:
        """Placement (active and pending), re-placement log, pins and a version above any served before,
        from Ray's internal KV. Endpoints are not stored: replicas re-register within a second."""
        raw = _kv_get(self.state_key) if self.state_key else None
        if not raw:
            return
        state = json.loads(raw)
        self.replacement.restore(state)
        self.overrides = {int(g): int(n) for g, n in state.get("overrides", {}).items()}
        self.version = int(state.get("version", 0)) + 1000
        active = self.replacement.active
        log.info("registry restored: placement v%s, version %d", active and active.version, self.version)

    def _persist(self) -> None:
        if not self.state_key:
            return
        state = {**self.replacement.to_dict(), "overrides": self.overrides, "version": self.version}
        _kv_put(self.state_key, json.dumps(state))

    async def register(self, info: dict[str, Any]) -> int:
        """Adds or refreshes a replica's entry (replicas call it every second: a no-op when unchanged)."""
        self.last_seen[info["replica_id"]] = time.monotonic()
        if self.entries.get(info["replica_id"]) == info:
            return self.version
        stale = [
            rid
            for rid, e in self.entries.items()
            if e["actor_id"] == info["actor_id"] and rid != info["replica_id"]
        ]
        for rid in stale:  # the same actor, restarted: its old endpoints are dead
            self.entries.pop(rid)
        self.entries[info["replica_id"]] = info
        self._maybe_activate()
        self._bump()
        return self.version

    # ---- live re-placement (steps: cluster/replacement.py) ----------------------------------------
    async def placement_state(self) -> dict[str, Any]:
        return self.replacement.describe()

    async def replace(self, placement_json: str | None = None) -> dict[str, Any]:
        """Admin call: starts a re-placement to `placement_json`, or to one planned from the current load.

        Replicas load their new slices; once every group has a replica serving the new version, it
        becomes active and routers switch at their next step boundary."""
        report = await self.load_report()
        given = Placement.from_json(placement_json) if placement_json else None
        event = self.replacement.start(report["expert_loads"], report["imbalance"], time.time(), given)
        self._maybe_activate()
        self._bump()
        return event

    def _maybe_activate(self) -> None:
        if self.replacement.activate_if_ready(self.entries.values(), time.time()):
            log.info("placement v%d active", self.replacement.active.version)

    async def _watch_imbalance(self) -> None:
        """Triggers `replace()` when the state machine says the imbalance lasted (checked every second)."""
        while True:
            await asyncio.sleep(1.0)
            report = await self.load_report()
            if self.replacement.should_replace(report["imbalance"], time.monotonic()):
                await self.replace()

    async def deregister(self, replica_id: str) -> int:
        self.last_seen.pop(replica_id, None)
        if self.entries.pop(replica_id, None) is not None:
            self._bump()
        return self.version

    async def report_unreachable(self, replica_id: str, timeout_s: float = 2.0) -> bool:
        """Drops `replica_id` unless it answers on its gRPC endpoint; returns whether it stays registered."""
        info = self.entries.get(replica_id)
        if info is None:
            return False
        if await _answers(info, timeout_s):
            return True
        log.info("replica %s (group %s) unreachable: deregistered", replica_id, info.get("group"))
        await self.deregister(replica_id)
        return False

    def _expire(self) -> None:
        """Drops entries whose replica stopped re-registering (killed without a chance to deregister)."""
        now = time.monotonic()
        dead = [rid for rid in self.entries if now - self.last_seen.get(rid, now) > self.entry_ttl_s]
        for rid in dead:
            log.info("replica %s silent for %.0fs: deregistered", rid, self.entry_ttl_s)
            self.entries.pop(rid)
            self.last_seen.pop(rid, None)
        if dead:
            self._bump()

    async def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        self._expire()
        return self.version, list(self.entries.values())

    async def wait_for_change(
        self, known_version: int, timeout_s: float = 5.0
    ) -> tuple[int, list[dict], str | None]:
        """Long poll: (version, entries, active placement JSON) once the version moves past `known_version`."""
        self._expire()
        if known_version == self.version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        active = self.replacement.active
        return self.version, list(self.entries.values()), active.to_json() if active else None


def _kv_get(key: str) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace="emoe")


def _kv_put(key: str, value: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace="emoe")


async def _answers(info: dict[str, Any], timeout_s: float) -> bool:
    import grpc

    from emoe.v1 import expert_pb2 as pb
    from emoe.v1 import expert_pb2_grpc as pb_grpc

    try:
        async with grpc.aio.insecure_channel(info["grpc_endpoint"]) as channel:
            reply = await pb_grpc.ExpertServiceStub(channel).Info(pb.ExpertInfoRequest(), timeout=timeout_s)
        return reply.replica_id == info["replica_id"]
    except grpc.aio.AioRpcError:
        return False
