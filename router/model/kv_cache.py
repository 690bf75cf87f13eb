"""Per-sequence KV cache for incremental decoding.

Each layer keeps a few tensors whose first dim is the position (GQA: K [L, Nkv, D], V [L, Nkv, D];
MLA: the compressed latent [L, r] and the shared rotary key [L, R]). Storage grows by doubling.
"""

from __future__ import annotations

import torch


class SequenceCache:
    """The cached keys and values of one sequence, for every layer."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.length = 0  # positions already cached (all layers agree after a full step)
        self._capacity = max(capacity, 1)
        self._layers: list[list[torch.Tensor] | None] = [None] * num_layers
        self._filled = [0] * num_layers

    def append(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Appends `new` (each [n, ...]) after this layer's cached positions; returns views of [0, L+n)."""
        n = new[0].shape[0]
        start = self._filled[layer]
        bufs = self._layers[layer]
        if bufs is None or start + n > bufs[0].shape[0]:
            bufs = self._grow(layer, new, start + n)
        for buf, t in zip(bufs, new, strict=True):
            buf[start : start + n] = t
        self._filled[layer] = start + n
        return [buf[: start + n] for buf in bufs]

    def _grow(self, layer: int, new: tuple[torch.Tensor, ...], need: int) -> list[torch.Tensor]:
        cap = self._capacity
        while cap < need:
            cap *= 2
        self._capacity = cap
        old = self._layers[layer]
        bufs = [t.new_empty((cap, *t.shape[1:])) for t in new]
        if old is not None:
            used = self._filled[layer]
            for b, o in zip(bufs, old, strict=True):
                b[:used] = o[:used]
        self._layers[layer] = bufs
        return bufs

    def advance(self, n: int) -> None:
        self.length += n
        assert all(f in (0, self.length) for f in self._filled), "layers out of step"


class KVPool:
    """The physical KV storage of a router: per layer, tensors of [num_blocks * block_size, ...] positions.

    Feature shapes are taken from the first write of each layer (GQA: K and V [Nkv, D]; MLA: latent [r]
    and rotary key [R]), so one pool serves every attention variant.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers: list[list[torch.Tensor] | None] = [None] * num_layers

    def storage(self, layer: int, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        bufs = self.layers[layer]
        if bufs is None:
            n = self.num_blocks * self.block_size
            bufs = self.layers[layer] = [t.new_zeros((n, *t.shape[1:])) for t in like]
        return bufs


class PagedSequenceCache:
    """One sequence's view of the pool for one step: writes new positions into its blocks, reads all back."""

    def __init__(self, pool: KVPool, block_table: list[int], length: int):
        self.pool, self.length = pool, length
        self._table = torch.tensor(block_table, dtype=torch.long)
        self._slots: dict[int, torch.Tensor] = {}

    def _positions_to_slots(self, end: int) -> torch.Tensor:
        slots = self._slots.get(end)
        if slots is None:
            pos = torch.arange(end)
            bs = self.pool.block_size
            slots = self._slots[end] = self._table[pos // bs] * bs + pos % bs
        return slots

    def append(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        n = new[0].shape[0]
        end = self.length + n
        slots = self._positions_to_slots(end)
        bufs = self.pool.storage(layer, new)
        if bufs[0].device != slots.device:
            slots = self._slots[end] = slots.to(bufs[0].device)
        for buf, t in zip(bufs, new, strict=True):
            buf.index_copy_(0, slots[self.length :], t)
        return [buf.index_select(0, slots) for buf in bufs]

    def advance(self, n: int) -> None:
        self.length += n


class PagedDecode:
    """A decode step over paged caches: each of B sequences adds one position, attention reads all at once.

    Built once per step (the slot indices are the same for every layer): `new_slots` [B] where each new
    position goes, `index` [B, L] the pool slots of each sequence's positions padded to the longest, `valid`
    [B, L] which of them are real, `positions` [B] the new positions.
    """

    def __init__(self, pool: KVPool, caches: list[PagedSequenceCache]):
        self.pool = pool
        lengths = torch.tensor([c.length + 1 for c in caches])  # [B] after this step's position
        longest = int(lengths.max())
        bs = pool.block_size
        width = (longest + bs - 1) // bs
        tables = torch.zeros(len(caches), width, dtype=torch.long)  # padded with block 0, masked below
        for i, c in enumerate(caches):
            t = c._table[:width]
            tables[i, : t.shape[0]] = t
        pos = torch.arange(longest)  # [L]
        self.index = tables[:, pos // bs] * bs + pos % bs  # [B, L]
        self.valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
        self.positions = lengths - 1  # [B]
        self.new_slots = self.index.gather(1, self.positions.unsqueeze(1)).squeeze(1)  # [B]
        self._device = None
        self._heads_index: dict[int, torch.Tensor] = {}
        self._bias: dict[tuple, torch.Tensor] = {}

    def append_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """k, v: [B, Nh, D], one position per sequence. Returns keys and values as [B * Nh, L, D],
        (sequence, head) major (padding not masked), gathered straight from the pool rows with
        `index_select`: no transposed copy (a strided bf16 copy of that size cost ~30x the gather here, and
        advanced indexing 4-8x)."""
        bufs = self.pool.storage(layer, (k, v))
        dev = bufs[0].device
        if self._device != dev:
            self.index, self.valid = self.index.to(dev), self.valid.to(dev)
            self.positions, self.new_slots = self.positions.to(dev), self.new_slots.to(dev)
            self._heads_index.clear()
            self._device = dev
        b, length = self.index.shape
        out = []
        for buf, t in zip(bufs, (k, v), strict=True):
            buf.index_copy_(0, self.new_slots, t)
            heads = buf.shape[1]
            rows = buf.view(buf.shape[0] * heads, *buf.shape[2:])  # one row per (slot, head)
            out.append(rows.index_select(0, self.heads_index(heads)).view(b * heads, length, *buf.shape[2:]))
        return out

    def heads_index(self, heads: int) -> torch.Tensor:
        """[B * heads * L] rows of a pool viewed as [slots * heads, ...], in (sequence, head, position) order."""
        idx = self._heads_index.get(heads)
        if idx is None:
            h = torch.arange(heads, device=self.index.device).view(1, heads, 1)
            idx = self._heads_index[heads] = (self.index.unsqueeze(1) * heads + h).reshape(-1)
        return idx

    def attention_bias(self, heads: int, dtype: torch.dtype, window: int | None) -> torch.Tensor:
        """[B * heads, 1, L]: 0 where a key is attended, -inf elsewhere (padding, outside the window); built
        once per step and window (gpt-oss alternates a sliding window and full attention by layer)."""
        key = (heads, dtype, window)
        bias = self._bias.get(key)
        if bias is None:
            mask = self.mask(window)
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            bias = self._bias[key] = bias.repeat_interleave(heads, dim=0).unsqueeze(1)
        return bias

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, L] True where the new position attends: real positions, and within the sliding window."""
        if window is None:
            return self.valid
        k_pos = torch.arange(self.valid.shape[1], device=self.valid.device).unsqueeze(0)
        return self.valid & (k_pos > self.positions.unsqueeze(1) - window)
