"""Remote dispatchers: expert groups in other processes, reached over gRPC or torch.distributed.

One dispatcher class; the transport is a pair of functions chosen once (connect, call). Per MoE layer:
  1. split the tokens by group (`split_by_group`), only the rows routed to each group travel;
  2. for every group at once: pick the healthy replica with the least outstanding tokens and call it;
     a failed or timed-out call marks that replica failed and is retried on another replica of the group;
     with none left, wait (bounded by `replacement_wait_s`) for a replacement to register;
  3. scatter-add the results.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from emoe.load import ExpertLoad
from emoe.metrics import Histogram
from emoe.placement import Placement
from router.dispatch.base import DispatchError, EndpointSource, TransportError, split_by_group

log = logging.getLogger(__name__)


@dataclass
class Replica:
    info: dict[str, Any]
    outstanding: int = 0
    failed_at: float | None = None
    conn: Any = None  # transport connection, made lazily

    @property
    def id(self) -> str:
        return self.info["replica_id"]


@dataclass
class DispatchStats:
    calls: int = 0
    failovers: int = 0
    tokens_per_group: dict[int, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)  # one group call, seconds


@dataclass(frozen=True)
class Transport:
    name: str
    connect: Callable[[dict[str, Any]], Awaitable[Any]]
    # call(conn, layer, version, hidden, local_ids, weights) -> [n, H]; each transport bounds its own wait
    call: Callable[..., Awaitable[torch.Tensor]]
    close: Callable[[Any], None]


class ReplicaPool:
    """The replicas of every group, refreshed from the endpoint source; least-outstanding selection."""

    def __init__(self, source: EndpointSource, failure_cooldown_s: float = 5.0):
        self.source, self.cooldown = source, failure_cooldown_s
        self.version = -1
        self.replicas: dict[str, Replica] = {}

    def refresh(self) -> None:
        version, entries = self.source.snapshot()
        if version == self.version:
            return
        live = {e["replica_id"]: e for e in entries}
        for rid in list(self.replicas):
            if rid not in live:
                self.replicas.pop(rid)
        for rid, info in live.items():
            if rid in self.replicas:
                self.replicas[rid].info = info  # e.g. the placement versions it serves changed
            else:
                self.replicas[rid] = Replica(info)
        self.version = version

    def healthy(self, group: int, exclude: set[str], version: int = 0) -> list[Replica]:
        now = time.monotonic()
        return [
            r
            for r in self.replicas.values()
            if r.info["group"] == group
            and version in r.info.get("placement_versions", (r.info.get("placement_version", version),))
            and r.id not in exclude
            and (r.failed_at is None or now - r.failed_at > self.cooldown)
        ]

    async def acquire(self, group: int, exclude: set[str], deadline: float, version: int = 0) -> Replica:
        """The least-loaded healthy replica not in `exclude`; with none, one already tried whose failure
        cooldown has passed (a transient failure, e.g. a replica slowed by a neighbour's restart, is
        retried, not waited out until the deadline); with none at all, waits for one to register."""
        while True:
            self.refresh()
            candidates = self.healthy(group, exclude, version) or self.healthy(group, set(), version)
            if candidates:
                return min(candidates, key=lambda r: r.outstanding)
            if time.monotonic() >= deadline:
                raise DispatchError(f"no healthy replica of expert group {group} within the wait bound")
            await asyncio.sleep(0.05)

    def mark_failed(self, replica: Replica) -> None:
        replica.failed_at = time.monotonic()
        self.source.report_unreachable(replica.id)


class RemoteDispatcher:
    def __init__(
        self,
        transport: Transport,
        source: EndpointSource,
        placement: Placement,
        wire_dtype: torch.dtype,
        *,
        replacement_wait_s: float = 60.0,
    ):
        self.transport, self.placement, self.wire_dtype = transport, placement, wire_dtype
        self.source = source
        self.pool = ReplicaPool(source)
        self.replacement_wait_s = replacement_wait_s
        self.counters = DispatchStats()
        self.router_id = uuid.uuid4().hex[:12]
        self.expert_load = ExpertLoad(placement.layers, placement.num_experts)
        self.publish_every_s = 1.0
        self._last_publish = 0.0

    async def forward(self, layer, hidden, topk_ids, topk_weights):
        self._count(layer, topk_ids)
        out = torch.zeros_like(hidden)  # [T, H]
        placement = self.placement
        parts = split_by_group(placement, layer, topk_ids)
        x = hidden.to(self.wire_dtype)
        results = await asyncio.gather(
            *(
                self._call_group(g, layer, x[rows], ids, topk_weights[rows], placement)
                for g, rows, ids in parts
            )
        )
        for (_, rows, _), y in zip(parts, results, strict=True):
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def begin_step(self) -> None:
        """Step boundary: switch to a newer active placement, if the registry has one. A step runs
        entirely on the placement it began with (the forward of every layer reads `self.placement`)."""
        text = self.source.active_placement()
        if text:
            new = Placement.from_json(text)
            if new.version > self.placement.version:
                log.info("switching to placement v%d", new.version)
                self.placement = new

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "transport": self.transport.name,
            "placement_version": self.placement.version,
            "calls": c.calls,
            "failovers": c.failovers,
            "tokens_per_group": dict(c.tokens_per_group),
            "dispatch_latency_s": c.latency.to_dict(),
        }

    async def _call_group(self, group, layer, x, local_ids, weights, placement) -> torch.Tensor:
        n = x.shape[0]
        self.counters.calls += 1
        self.counters.tokens_per_group[group] = self.counters.tokens_per_group.get(group, 0) + n
        tried: set[str] = set()
        deadline = time.monotonic() + self.replacement_wait_s
        while True:
            replica = await self.pool.acquire(group, tried, deadline, placement.version)
            replica.outstanding += n
            try:
                if replica.conn is None:
                    replica.conn = await self.transport.connect(replica.info)
                t0 = time.perf_counter()
                out = await self.transport.call(replica.conn, layer, placement.version, x, local_ids, weights)
                self.counters.latency.observe(time.perf_counter() - t0)
                return out
            except (
                TransportError,
                asyncio.TimeoutError,
            ) as e:  # a timeout: not built-in TimeoutError on 3.10
                log.warning("group %d replica %s failed (%r); retrying", group, replica.id, e)
                self._drop(replica)
                tried.add(replica.id)
                self.counters.failovers += 1
            finally:
                replica.outstanding -= n

    def _count(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Routed tokens per (layer, expert) over a sliding window, published to the registry each second."""
        self.expert_load.record(layer, topk_ids)
        now = time.monotonic()
        if now - self._last_publish >= self.publish_every_s:
            self._last_publish = now
            rates = self.expert_load.rates()
            loads = {layer: rates[i].tolist() for i, layer in enumerate(self.expert_load.layers)}
            self.source.publish_load(self.router_id, loads)

    def _drop(self, replica: Replica) -> None:
        if replica.conn is not None:
            self.transport.close(replica.conn)
            replica.conn = None
        self.pool.mark_failed(replica)

    def close(self) -> None:
        for r in self.pool.replicas.values():
            if r.conn is not None:
                self.transport.close(r.conn)
                r.conn = None
        self.source.close()
