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

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self._layers if bufs for b in bufs)
