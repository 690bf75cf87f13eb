"""Prefix-aware routing among Router replicas: a request goes to the replica most likely to hold its prompt's
KV blocks in its prefix cache, unless that replica is busier than the least loaded by more than `imbalance`
requests; a request without a known prefix goes to the least loaded.

`PrefixAffinity` is the policy (plain Python): it remembers, per chained block hash of the prompts it
routed (16-token blocks, as the engines' caches name them), the replica the prompt went to, least recently
used first out when it holds `max_entries`. It is approximate, as any router-side view is: a replica may
have evicted a block since; the cost of a wrong guess is one prefill, as without affinity.
`PrefixAffinityRouter` adapts it to Ray Serve's `RequestRouter` interface: the Frontend's handle to the
Router deployment ranks candidates with it, and Serve's own rejection protocol moves a request to the next
rank when the first is at `max_ongoing_requests`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

BLOCK = 16


def prefix_hashes(tokens: Sequence[int], block_size: int = BLOCK, max_blocks: int = 1024) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` (at most `max_blocks`)."""
    out: list[bytes] = []
    for i in range(min(len(tokens) // block_size, max_blocks)):
        h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
        h.update(array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        out.append(h.digest())
    return out


class PrefixAffinity:
    def __init__(self, imbalance: int = 4, max_entries: int = 500_000, block_size: int = BLOCK):
        self.imbalance, self.max_entries, self.block_size = imbalance, max_entries, block_size
        self.owner: OrderedDict[bytes, Hashable] = OrderedDict()
        self.load: dict[Hashable, int] = {}  # requests routed and not completed, per replica
        self.affinity_hits = 0  # requests sent to the replica that had their prefix

    def rank(self, candidates: Sequence[Hashable], tokens: Sequence[int] | None) -> list[list[Hashable]]:
        """Candidates in preference order, as Serve's ranks: [[preferred], [the rest, least loaded first]]."""
        if not candidates:
            return []
        by_load = sorted(candidates, key=lambda r: self.load.get(r, 0))
        least = self.load.get(by_load[0], 0)
        best = None
        if tokens:
            live = set(candidates)
            for h in reversed(prefix_hashes(tokens, self.block_size)):  # the longest known prefix first
                rid = self.owner.get(h)
                if rid in live:
                    if self.load.get(rid, 0) <= least + self.imbalance:
                        best = rid
                    break
        if best is None:
            return [[by_load[0]], by_load[1:]] if len(by_load) > 1 else [by_load]
        self.affinity_hits += 1
        rest = [r for r in by_load if r != best]
        return [[best], rest] if rest else [[best]]

    def routed(self, replica: Hashable, tokens: Sequence[int] | None) -> None:
        """`replica` took a request for `tokens`: it will hold their blocks."""
        self.load[replica] = self.load.get(replica, 0) + 1
        for h in prefix_hashes(tokens or (), self.block_size):
            self.owner[h] = replica
            self.owner.move_to_end(h)
        while len(self.owner) > self.max_entries:
            self.owner.popitem(last=False)

    def completed(self, replica: Hashable) -> None:
        if self.load.get(replica, 0) > 0:
            self.load[replica] -= 1

    def forget(self, replica: Hashable) -> None:
        """A replica died: nothing of it is cached any more."""
        self.load.pop(replica, None)
        for h in [h for h, r in self.owner.items() if r == replica]:
            del self.owner[h]


def _prompt(pending_request) -> list[int] | None:
    args = getattr(pending_request, "args", None) or ()
    return list(getattr(args[0], "prompt_token_ids", ()) or ()) or None if args else None


try:  # the Serve adapter; the policy above needs no Ray
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover - Ray is a dependency of the cluster package
    RequestRouter = object  # type: ignore[misc,assignment]


class PrefixAffinityRouter(RequestRouter):  # type: ignore[misc,valid-type]
    """Ray Serve request router of the Router deployment (set by `cluster.app` when `prefix_aware_routing`)."""

    def initialize_state(self, imbalance: int = 4, max_entries: int = 500_000, **_):
        self.policy = PrefixAffinity(imbalance=imbalance, max_entries=max_entries)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = self.policy.rank(list(by_id), _prompt(pending_request))
        return [[by_id[i] for i in rank] for rank in ranks if rank]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.policy.routed(replica_id, _prompt(pending_request))

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self.policy.completed(replica_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id)
