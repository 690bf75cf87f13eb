"""Loading the router half of a checkpoint: the dense weights, gates and shared experts as a RouterModel."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from emoe.checkpoint import Checkpoint
from emoe.spec import ModelSpec
from router.model.transformer import RouterModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choices: {', '.join(DTYPES)}")


def load_router_model(
    path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[ModelSpec, RouterModel]:
    """(spec, model) of the checkpoint at `path`; every tensor's shape is checked before any is read
    (a bad checkpoint raises CheckpointError naming the tensor or file)."""
    spec = ModelSpec.from_pretrained(path)
    dev = torch.device(device)
    ckpt = Checkpoint(path, spec)
    try:
        ckpt.check_shapes()
        if ckpt.skipped_mtp:
            log.info(
                "%s: skipping %d multi-token-prediction tensor(s) (%s ...): not used to generate",
                path,
                len(ckpt.skipped_mtp),
                ckpt.skipped_mtp[0],
            )

        def get(name: str, want: torch.dtype | None = None) -> torch.Tensor:
            return ckpt.get(name, want or dtype).to(dev)

        return spec, RouterModel(spec, get, dtype)
    finally:
        ckpt.close()
