"""Continuous-batching scheduler and KV block manager. Plain Python: no torch, testable in milliseconds.

Each step the scheduler picks, under a token budget and the KV-block budget:
  1. running sequences first (a decode is 1 token, an unfinished prefill continues with its next chunk);
     when a running sequence needs a block and none is free, the most recently admitted running sequence
     is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
     from its prompt plus the tokens it already produced (preemption by recompute);
  2. then waiting sequences, oldest first, each admitted only if the blocks for its first chunk are free
     (admission control: a request waits rather than overcommitting memory).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class BlockManager:
    """Fixed pool of KV blocks of `block_size` positions; a sequence owns a list of block ids."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_grow(self, table: list[int], num_positions: int) -> bool:
        return self.blocks_for(num_positions) - len(table) <= len(self._free)

    def grow(self, table: list[int], num_positions: int) -> None:
        """Extends `table` in place so it covers `num_positions` positions."""
        need = self.blocks_for(num_positions) - len(table)
        assert need <= len(self._free), "grow without can_grow"
        for _ in range(max(0, need)):
            table.append(self._free.pop())

    def release(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()


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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def _reserve(self, seq: Sequence, num_positions: int) -> bool:
        """Blocks for `num_positions` of a running sequence, preempting newer sequences if needed."""
        while not self.blocks.can_grow(seq.block_table, num_positions):
            victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.order)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, num_positions)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Frees the sequence's blocks at once (finished, stopped or cancelled)."""
        self.blocks.release(seq.block_table)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
