"""One `.safetensors` file: its header parsed and checked on open (own parser), tensors read with pread.

A tensor is read whole or by rows of its first dim (`read(name, rows)`: only those rows' bytes), so an expert
group reads only its experts of a tensor that stacks all of a layer's experts (gpt-oss).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from emoe.layout import Shape

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint is incomplete, inconsistent or corrupt; the message names the tensor or file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: Shape
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One `.safetensors` file: its header parsed and checked on open, tensors read on demand with pread."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            self.tensors = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> dict[str, TensorInfo]:
        if self.size < 8:
            raise CheckpointError(f"{self.path}: file too short for a safetensors header ({self.size} bytes)")
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if n > MAX_HEADER_BYTES or 8 + n > self.size:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt safetensors header (declares {n} bytes, file has {self.size})"
            )
        try:
            raw = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from e
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        base = 8 + n
        out = {}
        for name, meta in raw.items():
            if name == "__metadata__":
                continue
            out[name] = self._entry(name, meta, base)
        return out

    def _entry(self, name: str, meta: dict, base: int) -> TensorInfo:
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (base + int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {meta!r}") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize or start < base:
            raise CheckpointError(f"{self.path}: tensor {name!r}: data offsets do not match dtype and shape")
        if end > self.size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: data ends at byte {end} but the file has {self.size} (truncated?)"
            )
        return TensorInfo(dtype, shape, start, end)

    def read(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The tensor `name`, or only `rows` of its first dim (in that order): only their bytes are read."""
        info = self.tensors[name]
        if rows is None:
            shape, spans = info.shape, [(info.start, info.end)]
        else:
            n = info.shape[0] if info.shape else 0
            if any(not 0 <= r < n for r in rows):
                raise CheckpointError(f"{self.path}: tensor {name!r}: rows {list(rows)} outside [0, {n})")
            row = (info.end - info.start) // n
            shape, spans = (len(rows), *info.shape[1:]), _spans(rows, info.start, row)
        buf = bytearray(sum(b - a for a, b in spans))
        view, done = memoryview(buf), 0
        for a, b in spans:
            self._pread_into(view[done : done + b - a], a, name)
            done += b - a
        if not buf:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(shape)

    def _pread_into(self, view: memoryview, offset: int, name: str) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading tensor {name!r}")
            done += got

    def close(self) -> None:
        os.close(self._fd)


def _spans(rows: Sequence[int], start: int, row: int) -> list[tuple[int, int]]:
    """Byte ranges of `rows` (each `row` bytes from `start`), consecutive rows merged into one range."""
    spans: list[tuple[int, int]] = []
    for r in rows:
        a = start + r * row
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], a + row)
        else:
            spans.append((a, a + row))
    return spans
