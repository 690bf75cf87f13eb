"""Lazy reader of Hugging Face safetensors checkpoints, single-file or sharded.

A consumer reads tensors by name; only the files holding them are opened and only their bytes are read
(`Checkpoint.stats` counts both, so tests can prove that an expert group read only its experts). Sharded
checkpoints are followed through `model.safetensors.index.json`'s `weight_map`; shard file names are never
guessed. FP8 block-quantized weights (`weight_scale_inv`) are dequantized as they are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emoe.layout import Shape, expected_tensors, is_quantizable
from emoe.spec import ModelSpec, ceil_div

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
SCALE_SUFFIX = "_scale_inv"

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
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(ValueError):
    """A checkpoint is incomplete, inconsistent or corrupt; the message names the tensor or file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: Shape
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class ReadStats:
    files_opened: set[str] = field(default_factory=set)
    tensors_read: set[str] = field(default_factory=set)
    data_bytes_read: int = 0


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

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = bytearray(info.end - info.start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self._fd, [view[done:]], info.start + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading tensor {name!r}")
            done += got
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        os.close(self._fd)


class Checkpoint:
    """The tensors of one checkpoint directory, by name, read lazily.

    `get(name, dtype)` returns the tensor in `dtype` (FP8 weights dequantized with their `weight_scale_inv`).
    With a `spec`, every name and shape is checked against the hub layout of that model.
    """

    def __init__(self, path: str | Path, spec: ModelSpec | None = None):
        self.path = Path(path)
        self.spec = spec
        self.weight_map = _weight_map(self.path)
        self._files: dict[str, SafetensorsFile] = {}
        self.stats = ReadStats()
        self._expected = expected_tensors(spec) if spec else None
        self.skipped_mtp: list[str] = []
        if spec is not None:
            self._check_names()

    # ---- checks --------------------------------------------------------------------------------
    def _check_names(self) -> None:
        assert self._expected is not None and self.spec is not None
        have = set(self.weight_map)
        missing = sorted(set(self._expected) - have)
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise CheckpointError(f"{self.path}: checkpoint is missing tensor(s): {shown}")
        # multi-token-prediction weights are not used to generate; the model loader says so once
        self.skipped_mtp = sorted(n for n in have - set(self._expected) if self._is_mtp(n))
        rest = have - set(self._expected) - set(self.skipped_mtp)
        extra = sorted(n for n in rest if not self._is_ignorable(n))
        if extra:
            shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
            raise CheckpointError(f"{self.path}: checkpoint has unexpected tensor(s): {shown}")

    def _is_mtp(self, name: str) -> bool:
        """Multi-token-prediction weights: layers past num_hidden_layers (DeepSeek-V3, GLM-4.5) or `mtp.*`."""
        assert self.spec is not None
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit():
            return int(parts[2]) >= self.spec.ignore_layers_from
        return parts[0] == "mtp" or name.startswith("model.mtp.")

    def _is_ignorable(self, name: str) -> bool:
        assert self._expected is not None and self.spec is not None
        if name.endswith("rotary_emb.inv_freq"):
            return True
        if name.endswith(SCALE_SUFFIX) and self.spec.fp8 is not None:
            return name[: -len(SCALE_SUFFIX)] in self._expected
        return False

    def check_shapes(self, names: list[str] | None = None) -> None:
        """Reads the headers (not the data) of the files holding `names` (default: all) and checks shapes."""
        assert self._expected is not None, "check_shapes needs a spec"
        for name in names if names is not None else list(self._expected):
            self._info(name)

    # ---- reading -------------------------------------------------------------------------------
    def _file(self, name: str) -> SafetensorsFile:
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: checkpoint is missing tensor {name!r}")
        f = self._files.get(fname)
        if f is None:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{self.path}: shard file {fname!r} (holding {name!r}) does not exist")
            f = self._files[fname] = SafetensorsFile(fpath)
            self.stats.files_opened.add(fname)
        if name not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor {name!r} is listed in the index but not in this file")
        return f

    def _info(self, name: str) -> TensorInfo:
        info = self._file(name).tensors[name]
        want = self._expected.get(name) if self._expected is not None else None
        if want is not None and info.shape != want:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(want)}"
            )
        return info

    def _raw(self, name: str) -> torch.Tensor:
        self._info(name)
        f = self._file(name)
        t = f.read(name)
        self.stats.tensors_read.add(name)
        self.stats.data_bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self._raw(name)
        if t.dtype in FP8_DTYPES:
            t = self._dequantize(name, t)
        return t.to(dtype)

    def _dequantize(self, name: str, w: torch.Tensor) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
        if self.spec is not None and not is_quantizable(name):
            raise CheckpointError(f"{self.path}: tensor {name!r} is FP8 but is not a quantizable weight")
        scale = self._raw(scale_name).float()
        block = self.spec.fp8.block if self.spec is not None and self.spec.fp8 is not None else None
        return dequantize_fp8(w, scale, block=block, name=name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, *, block: tuple[int, int] | None = None, name: str = "weight"
) -> torch.Tensor:
    """`w` [O, I] in FP8 times its per-block `scale_inv` [ceil(O/bo), ceil(I/bi)] -> float32 [O, I]."""
    out_dim, in_dim = w.shape
    so, si = scale_inv.shape
    bo, bi = block if block is not None else (ceil_div(out_dim, so), ceil_div(in_dim, si))
    if ceil_div(out_dim, bo) != so or ceil_div(in_dim, bi) != si:
        raise CheckpointError(
            f"tensor {name!r}: scale_inv shape {[so, si]} does not tile shape {[out_dim, in_dim]}"
        )
    scale = scale_inv.repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return w.float() * scale


def _weight_map(path: Path) -> dict[str, str]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        return weight_map
    single = path / SINGLE_NAME
    if single.is_file():
        f = SafetensorsFile(single)
        names = list(f.tensors)
        f.close()
        return {n: SINGLE_NAME for n in names}
    raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME}")
