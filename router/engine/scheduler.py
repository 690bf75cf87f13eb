"""Continuous-batching scheduler and KV block manager. Plain Python: no torch, testable in milliseconds.

Each step the scheduler picks, under a token budget and the KV-block budget:
  1. running sequences first (a decode is 1 token, an unfinished prefill continues with its next chunk);
     when a running sequence needs a block and none is free, the most recently admitted running sequence
     is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
     from its prompt plus the tokens it already produced (preemption by recompute);
  2. then waiting sequences, oldest first, each admitted only if the blocks for its first chunk are free
     (admission control: a request waits rather than overcommitting memory); a sequence whose prompt
     starts with cached blocks (automatic prefix caching, see BlockManager) takes them, counts only its
     uncached blocks, and starts its prefill at its first uncached token; one whose next block another
     running sequence is computing right now (the `n` choices of one prompt, agents sharing a system
     prompt) waits until that block is named, and then shares it instead of computing it again.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class BlockManager:
    """Fixed pool of KV blocks of `block_size` positions; a sequence holds a list of block ids.

    Automatic prefix caching (on unless `prefix_caching=False`): a full block is named by a hash chained
    over its tokens and its parent block's hash (and `salt`, what else changes the KV: the model), so one
    hash stands for the whole prefix up to that block. Blocks are reference-counted; a block no sequence
    holds keeps its contents and its name and is evicted least recently released first, only when a new
    block is needed (a sequence's tail blocks go before its head, so the chains that stay are prefixes).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True, salt: bytes = b""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching, self.salt = prefix_caching, salt
        self._free = list(range(num_blocks - 1, -1, -1))  # blocks without cached contents
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by no one; LRU first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._filling: dict[bytes, Sequence] = {}  # a prompt block a running sequence is computing now
        self.queries = 0  # prompt tokens looked up at admission
        self.hits = 0  # of which served from cached blocks
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, or cached and held by no one."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_grow(self, table: list[int], num_positions: int) -> bool:
        return self.blocks_for(num_positions) - len(table) <= self.num_free

    def grow(self, table: list[int], num_positions: int) -> None:
        """Extends `table` in place so it covers `num_positions` positions."""
        need = self.blocks_for(num_positions) - len(table)
        assert need <= self.num_free, "grow without can_grow"
        for _ in range(max(0, need)):
            table.append(self._take())

    def release(self, table: list[int]) -> None:
        for b in reversed(table):  # the tail first: evicted before the blocks it extends
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        table.clear()

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(b)]
            self.evictions += 1
        self._ref[b] = 1
        return b

    # ---- prefix caching ------------------------------------------------------------------------
    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, extended to at least its first `num_blocks` full blocks' chained hashes
        (each computed once per sequence; not copied: callers index it)."""
        bs, have = self.block_size, seq.block_hashes
        while len(have) < num_blocks:
            i = len(have)
            h = hashlib.blake2b(have[-1] if have else self.salt, digest_size=16)
            h.update(array("q", seq.token_slice(i * bs, bs)).tobytes())
            have.append(h.digest())
        return have

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold `seq`'s longest cached prefix of full blocks, leaving at least its
        last token to compute (its logits sample the next token)."""
        if not self.prefix_caching or not seq.use_prefix_cache:
            return []
        hit, limit = [], (seq.num_tokens - 1) // self.block_size
        hashes = self.hashes(seq, limit)
        for i in range(limit):
            b = self._by_hash.get(hashes[i])
            if b is None:
                break
            hit.append(b)
        return hit

    def waits_for_fill(self, seq: Sequence, num_hit: int) -> bool:
        """Whether the block after `seq`'s cached prefix is being computed by a running sequence with the
        same prefix (e.g. another of `n` choices admitted just before): then `seq` is better admitted once
        that block is named, to share it, than computing it a second time now."""
        if not self._filling or not self.prefix_caching or not seq.use_prefix_cache:
            return False
        if num_hit >= (seq.num_tokens - 1) // self.block_size:
            return False
        return self.hashes(seq, num_hit + 1)[num_hit] in self._filling

    def will_fill(self, seq: Sequence) -> None:
        """`seq` was admitted: the full blocks of its known tokens past its cached prefix are in flight."""
        if not self.prefix_caching:
            return
        full = seq.num_tokens // self.block_size
        hashes = self.hashes(seq, full)
        for i in range(seq.num_registered // self.block_size, full):
            self._filling.setdefault(hashes[i], seq)

    def unfill(self, seq: Sequence) -> None:
        """`seq` stops computing (preempted, finished): its unnamed blocks are no longer in flight."""
        if not self._filling:
            return
        for h in seq.block_hashes[seq.num_registered // self.block_size :]:
            if self._filling.get(h) is seq:
                del self._filling[h]

    def can_admit(self, hit: list[int], num_positions: int) -> bool:
        """Whether a sequence whose prefix is `hit` can be given blocks up to `num_positions`: only its
        uncached blocks count, and a hit block that nobody holds stops being free once taken."""
        idle = sum(1 for b in hit if self._ref[b] == 0)
        return self.blocks_for(num_positions) - len(hit) <= self.num_free - idle

    def take_prefix(self, seq: Sequence, hit: list[int]) -> None:
        """Gives `seq` (no blocks yet) the cached blocks `hit`; its prefill starts after them."""
        assert not seq.block_table
        for b in hit:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        seq.block_table.extend(hit)
        seq.num_computed = seq.num_registered = len(hit) * self.block_size
        if seq.cached_tokens < 0:
            seq.cached_tokens = seq.num_computed
        if self.prefix_caching and seq.use_prefix_cache:
            self.queries += seq.num_tokens
            self.hits += seq.num_computed

    def register(self, seq: Sequence) -> None:
        """Names the blocks `seq` has filled since the last call, so later sequences can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        first = seq.num_registered // bs
        if full <= first:
            return
        hashes = self.hashes(seq, full)
        for i in range(first, full):
            h, b = hashes[i], seq.block_table[i]
            if h not in self._by_hash and b not in self._hash_of:  # else an equal block is named already
                self._by_hash[h] = b
                self._hash_of[b] = h
            if self._filling.get(h) is seq:
                del self._filling[h]
        seq.num_registered = full * bs

    def stats(self) -> dict[str, Any]:
        return {
            "prefix_cache_queries": self.queries,
            "prefix_cache_hits": self.hits,
            "prefix_cache_hit_rate": self.hits / self.queries if self.queries else 0.0,
            "prefix_cache_blocks": self.num_cached,
            "prefix_cache_evictions": self.evictions,
        }


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_order = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # positions whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    order: int = field(default_factory=lambda: next(_order))
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    num_registered: int = 0  # positions whose blocks are named in the prefix cache
    use_prefix_cache: bool = True  # False: computed from its first token (e.g. for prompt logprobs)
    cached_tokens: int = -1  # positions served from the prefix cache at its first admission (-1: not yet)
    state: Any = None  # the engine's per-request state (sampler, detokenizer, queue)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, n: int) -> list[int]:
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start : start + n]
        return (self.prompt + self.output)[start : start + n]


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    n: int  # positions computed in this step

    @property
    def samples(self) -> bool:
        """Whether this step completes the sequence's known tokens, so its next token is sampled."""
        return self.start + self.n == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int = 512, max_num_seqs: int = 64):
        self.blocks = blocks
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget, chunks = self.max_batch_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if n == 0 or not self._reserve(seq, seq.num_computed + n):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]  # holds no blocks: new, or preempted (its blocks released)
            hit = self.blocks.match(seq)
            if self.blocks.waits_for_fill(seq, len(hit)):  # its next block is being computed: share it
                deferred.append(self.waiting.popleft())
                continue
            start = len(hit) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            if not self.blocks.can_admit(hit, start + n):
                break
            self.waiting.popleft()
            self.blocks.take_prefix(seq, hit)
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            self.blocks.will_fill(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # in their order, still ahead of later arrivals
        return chunks

    def _reserve(self, seq: Sequence, num_positions: int) -> bool:
        """Blocks for `num_positions` of a running sequence, preempting newer sequences if needed."""
        while not self.blocks.can_grow(seq.block_table, num_positions):
            # the most recently admitted: later in `running` than `seq`, so not scheduled in this step yet
            victim = next(s for s in reversed(self.running) if s.status is Status.RUNNING)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, num_positions)
        return True

    def computed(self, seq: Sequence, num_computed: int) -> None:
        """A step computed `seq`'s positions up to `num_computed`: its newly full blocks become shareable."""
        seq.num_computed = num_computed
        self.blocks.register(seq)

    def preempt(self, seq: Sequence) -> None:
        """Frees the blocks of `seq` (they stay cached: its recompute starts from its cached prefix)."""
        self.blocks.unfill(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = seq.num_registered = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Frees the sequence's blocks at once (finished, stopped or cancelled)."""
        self.blocks.unfill(seq)
        self.blocks.release(seq.block_table)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
