"""Lazy reader of Hugging Face safetensors checkpoints, single-file or sharded.

A consumer reads tensors by name; only the files holding them are opened and only their bytes are read
(`Checkpoint.stats` counts both, so tests can prove that an expert group read only its experts). Sharded
checkpoints are followed through `model.safetensors.index.json`'s `weight_map`; shard file names are never
guessed. FP8 block-quantized weights (`weight_scale_inv`) and MXFP4 experts (`_blocks` + `_scales`) are
dequantized as they are read. The file format itself is `emoe/safetensors_file.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emoe.layout import MXFP4_SUFFIXES, expected_tensors, is_quantizable
from emoe.quant import FP8_DTYPES, dequantize_fp8, dequantize_mxfp4
from emoe.safetensors_file import CheckpointError, SafetensorsFile, TensorInfo
from emoe.spec import ModelSpec

__all__ = ["Checkpoint", "CheckpointError", "ReadStats", "dequantize_fp8", "dequantize_mxfp4"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


@dataclass
class ReadStats:
    files_opened: set[str] = field(default_factory=set)
    tensors_read: set[str] = field(default_factory=set)
    data_bytes_read: int = 0


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

    def _raw(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        self._info(name)
        f = self._file(name)
        t = f.read(name, rows)
        self.stats.tensors_read.add(name)
        self.stats.data_bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self._raw(name)
        if t.dtype in FP8_DTYPES:
            t = self._dequantize(name, t)
        return t.to(dtype)

    def get_experts(
        self, name: str, experts: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows `experts` of a tensor that stacks a layer's experts ([E, ...] -> [len(experts), ...]); only
        their bytes are read. An MXFP4 weight (spec.mxfp4: `name_blocks` [E, out, in/32, 16] + `name_scales`)
        comes back dequantized in `name`'s unquantized layout [E, in, out], as transformers loads it."""
        blocks_name, scales_name = (name + s for s in MXFP4_SUFFIXES)
        if self.spec is None or not self.spec.mxfp4 or blocks_name not in self.weight_map:
            return self._raw(name, experts).to(dtype)
        blocks, scales = self._raw(blocks_name, experts), self._raw(scales_name, experts)
        out = torch.empty(
            (len(experts), *blocks.shape[1:-2], blocks.shape[-2] * blocks.shape[-1] * 2), dtype=dtype
        )
        for i in range(len(experts)):  # one expert at a time: the float32 codes of a whole layer are large
            out[i] = dequantize_mxfp4(blocks[i], scales[i], name=name)
        return out.transpose(1, 2)

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
