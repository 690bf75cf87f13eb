"""Checkpoint reader: sharded and single-file, lazy, dtypes, and bad checkpoints named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emoe.checkpoint import Checkpoint, CheckpointError, dequantize_fp8
from emoe.demo import demo_config, random_weights, write_checkpoint
from emoe.layout import expert_keys
from emoe.placement import Placement
from emoe.spec import ModelSpec
from experts import ExpertStore
from router import Engine
from tests.conftest import TINY, write_tiny
from tests.hf_fixtures import make_hf_checkpoint

EXPERT = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


def tiny_parts():
    cfg = demo_config("demo", **TINY)
    spec = ModelSpec.from_config(cfg)
    return cfg, spec, random_weights(spec, 0, torch.float32)


def test_expert_group_reads_only_its_experts(tmp_path):
    path = make_hf_checkpoint("mixtral", tmp_path / "m", max_shard_size="20KB")
    spec = ModelSpec.from_pretrained(path)
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, 3)
    ckpt = Checkpoint(path, spec)
    ExpertStore.from_checkpoint(ckpt, spec, placement.groups[1], torch.float32)
    mine = {k for layer, ids in placement.groups[1].items() for e in ids for k in expert_keys(spec, layer, e)}
    assert ckpt.stats.tensors_read == mine
    sizes = {n: 4 * torch.Size(s).numel() for n, s in _shapes(path).items()}
    assert ckpt.stats.data_bytes_read == sum(sizes[n] for n in mine)
    assert ckpt.stats.files_opened == {ckpt.weight_map[n] for n in mine}
    assert len(ckpt.stats.files_opened) < len(set(ckpt.weight_map.values()))


def _shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as so:
            out.update({n: so.get_slice(n).get_shape() for n in so.keys()})
    return out


def test_single_file_checkpoint(tmp_path):
    cfg, spec, tensors = tiny_parts()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sharded = write_tiny(tmp_path / "sharded")
    with Engine.from_pretrained(tmp_path) as a, Engine.from_pretrained(sharded) as b:
        torch.testing.assert_close(a.logits([[1, 2, 3]])[0], b.logits([[1, 2, 3]])[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, dtype):
    path = write_tiny(tmp_path / "half", dtype=dtype)
    ckpt = Checkpoint(path, ModelSpec.from_pretrained(path))
    raw = ckpt.get(EXPERT, dtype)
    assert raw.dtype == dtype
    assert torch.equal(ckpt.get(EXPERT, torch.float32), raw.float())
    with Engine.from_pretrained(path, dtype="bfloat16") as engine:
        assert torch.isfinite(engine.logits([[1, 2, 3]])[0]).all()


def test_fp8_dequantize_blocks():
    w = torch.randn(5, 7)
    scale = torch.tensor([[2.0, 3.0], [5.0, 7.0]])
    fp8 = (w / 4).to(torch.float8_e4m3fn)
    out = dequantize_fp8(fp8, scale, block=(4, 4))
    assert out[0, 0] == fp8[0, 0].float() * 2 and out[4, 6] == fp8[4, 6].float() * 7
    with pytest.raises(CheckpointError, match="does not tile"):
        dequantize_fp8(fp8, scale, block=(2, 4))


# ---- bad checkpoints: each error names what is wrong -----------------------------------------------


def test_missing_tensor(tmp_path):
    cfg, _, tensors = tiny_parts()
    del tensors[EXPERT]
    write_checkpoint(tmp_path, tensors, cfg, max_shard_bytes=4096)
    with pytest.raises(CheckpointError, match=f"missing tensor.*{EXPERT}"):
        Engine.from_pretrained(tmp_path)


def test_extra_tensor(tmp_path):
    cfg, _, tensors = tiny_parts()
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    write_checkpoint(tmp_path, tensors, cfg, max_shard_bytes=4096)
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.mlp.surprise.weight"):
        Engine.from_pretrained(tmp_path)


def test_wrong_shape(tmp_path):
    cfg, _, tensors = tiny_parts()
    tensors[EXPERT] = torch.zeros(3, 32)
    write_checkpoint(tmp_path, tensors, cfg, max_shard_bytes=4096)
    with pytest.raises(CheckpointError, match=rf"{EXPERT}.*shape \[3, 32\], expected \[16, 32\]"):
        Engine.from_pretrained(tmp_path)


def test_unknown_model_type(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    (tiny_ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_moe_9000"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_moe_9000'"):
        Engine.from_pretrained(tiny_ckpt)


def _shard_of(path: Path, name: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


@pytest.mark.parametrize(
    "cut, needle",
    [(5, "too short for a safetensors header"), (40, "truncated or corrupt safetensors header")],
)
def test_truncated_header(tiny_ckpt, cut, needle):
    shard = _shard_of(tiny_ckpt, EXPERT)
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*{needle}"):
        Engine.from_pretrained(tiny_ckpt)


def test_corrupt_header_json(tiny_ckpt):
    shard = _shard_of(tiny_ckpt, EXPERT)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt safetensors header"):
        Engine.from_pretrained(tiny_ckpt)


def test_truncated_data_names_the_tensor(tiny_ckpt):
    shard = _shard_of(tiny_ckpt, EXPERT)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"tensor '.*': data ends at byte \d+ but the file has"):
        Engine.from_pretrained(tiny_ckpt)


def test_missing_shard_file(tiny_ckpt):
    shard = _shard_of(tiny_ckpt, EXPERT)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard file '{shard.name}'.*does not exist"):
        Engine.from_pretrained(tiny_ckpt)


def test_fp8_weight_without_scale(tmp_path):
    cfg, _, tensors = tiny_parts()
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    tensors[EXPERT] = tensors[EXPERT].to(torch.float8_e4m3fn)
    write_checkpoint(tmp_path, tensors, cfg, max_shard_bytes=4096)
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{EXPERT}' has no '{EXPERT}_scale_inv'"):
        Engine.from_pretrained(tmp_path)


def test_missing_directory_and_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(demo_config("demo", **TINY)))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        Engine.from_pretrained(tmp_path)
