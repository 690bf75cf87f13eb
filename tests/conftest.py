"""Shared test fixtures. Tests are split by what they need: unit/ (no Ray), cluster/, e2e/, gpu/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from emoe.demo import demo_config, random_weights, write_checkpoint
from emoe.spec import ModelSpec
from tests.ray_fixture import ray_cluster  # noqa: F401 - session fixture

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rotary_dim=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    intermediate_size=16,
    vocab_size=96,
)


def write_tiny(
    path: Path, *, dtype: torch.dtype = torch.float32, shard_bytes: int = 4096, **overrides
) -> Path:
    """A tiny minimax_m2 checkpoint written by our own writer, sharded small."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = demo_config("demo", **{**TINY, **overrides})
    spec = ModelSpec.from_config(cfg)
    write_checkpoint(path, random_weights(spec, 0, dtype), cfg, max_shard_bytes=shard_bytes)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "tiny")
