"""Tiny random Hugging Face MoE checkpoints, built with transformers' own model classes.

These are correctness oracles: a checkpoint written here is loaded both by elastic-moe and by
``transformers`` (:func:`load_hf_model`), and the two must agree.

Plain helper functions only (no pytest fixtures), so any test, script or benchmark can import it::

    from tests.hf_fixtures import FAMILIES, make_hf_checkpoint, load_hf_model, make_fp8_minimax_checkpoint

Design notes
------------
* Every parameter is re-drawn from a ``torch.Generator`` seeded with ``seed`` (in ``named_parameters``
  order), so checkpoints do not depend on transformers' ``_init_weights`` details.  Matrices get
  N(0, ``INIT_STD``) -- much larger than the usual 0.02 -- and ``lm_head`` (or the tied embedding) N(0,
  ``LM_HEAD_STD``), so that logits are spread out (std ~2.5) and greedy decoding is not decided by near-ties
  (top-1 minus top-2 logit < 1e-3 at ~0.1% of positions of random prompts, median gap ~0.6-1.2). RMSNorm
  weights get ``1 + 0.1 * N(0, 1)`` and biases ``0.1 * N(0, 1)`` so that a loader which forgets them is caught.
* Routers (``*.mlp.gate.weight`` in memory, i.e. the MoE router -- never the dense ``gate_proj`` nor the
  qwen2_moe ``shared_expert_gate``) are redrawn with std ``ROUTER_LOGIT_STD / sqrt(hidden)`` so router logits
  have std ~``ROUTER_LOGIT_STD``: routing depends strongly on the input, but sigmoid routers
  (minimax_m2, deepseek_v3) do not saturate into exact ties at 1.0.
* ``e_score_correction_bias`` buffers (minimax_m2, deepseek_v3) are filled with ``0.1 * N(0, 1)``: they change
  the top-k choice for some tokens but not all.
* transformers 5.x keeps experts fused in memory (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``)
  but ``save_pretrained`` reverts its conversion mapping, so the files keep the hub per-expert layout
  (``model.layers.1.block_sparse_moe.experts.3.w1.weight``, ``model.layers.1.mlp.experts.3.gate_proj.weight``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "minimax_m2", "deepseek_v3")

INIT_STD = 0.15
LM_HEAD_STD = 0.4  # logits std ~2.5: top-1/top-2 gaps well above fp noise
ROUTER_LOGIT_STD = 3.0
E_SCORE_BIAS_STD = 0.1
NORM_JITTER = 0.1
BIAS_STD = 0.1

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

# Per-family config kwargs (vocab_size / tie_word_embeddings / token ids are added by _make_config).
FAMILY_CONFIG_KWARGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
    ),
    "qwen2_moe": dict(
        hidden_size=32,
        intermediate_size=64,  # unused when every layer is sparse, kept for completeness
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        qkv_bias=True,
        decoder_sparse_step=1,
        use_sliding_window=False,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "qwen3_moe": dict(
        hidden_size=32,
        head_dim=16,  # != hidden_size // num_attention_heads on purpose
        intermediate_size=56,  # dense MLP of the mlp_only layer
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        use_sliding_window=False,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "minimax_m2": dict(
        hidden_size=48,
        head_dim=16,  # 4 * 16 = 64 != hidden_size on purpose (as in the real model: 48 * 128 != 3072)
        rotary_dim=8,  # legacy field of the released checkpoints -> partial_rotary_factor 0.5
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    ),
    "deepseek_v3": dict(
        hidden_size=64,
        intermediate_size=96,  # dense MLP of layer 0
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        num_nextn_predict_layers=0,  # no MTP weights are written
        max_position_embeddings=256,
    ),
}

_CONFIG_CLASS_NAMES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "minimax_m2": "MiniMaxM2Config",
    "deepseek_v3": "DeepseekV3Config",
}

# In-memory (transformers) names of MoE routers: `<...>.mlp.gate.weight`. Not `gate_proj`, not `shared_expert_gate`.
_ROUTER_RE = re.compile(r"\.mlp\.gate\.weight$")
_NORM_RE = re.compile(r"(norm|layernorm)[^.]*\.weight$")


def _make_config(family: str, *, vocab_size: int, tie_word_embeddings: bool):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cls = getattr(transformers, _CONFIG_CLASS_NAMES[family])
    kwargs = dict(FAMILY_CONFIG_KWARGS[family])
    kwargs.update(
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID if vocab_size > BOS_TOKEN_ID else None,
        eos_token_id=EOS_TOKEN_ID if vocab_size > EOS_TOKEN_ID else None,
        pad_token_id=None,
        initializer_range=INIT_STD,
        dtype="float32",
    )
    return cls(**kwargs)


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter and the e_score_correction_bias buffers, deterministically from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32)

    out_emb = model.get_output_embeddings()
    lm_head_ids = {id(out_emb.weight)} if out_emb is not None else set()
    for name, p in model.named_parameters():  # tied lm_head appears once, as the embedding
        if id(p) in lm_head_ids:
            val = LM_HEAD_STD * randn(p)
        elif _ROUTER_RE.search(name):
            val = randn(p) * (ROUTER_LOGIT_STD / math.sqrt(hidden))
        elif p.ndim == 1 and _NORM_RE.search(name):
            val = 1.0 + NORM_JITTER * randn(p)
        elif name.endswith(".bias"):
            val = BIAS_STD * randn(p)
        elif p.ndim == 1:
            val = 1.0 + NORM_JITTER * randn(p)  # any other 1-D weight is a norm-like scale
        else:
            val = INIT_STD * randn(p)
        p.copy_(val.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_((E_SCORE_BIAS_STD * randn(b)).to(b.dtype))


def build_hf_model(family: str, *, seed: int = 0, vocab_size: int = 128, tie_word_embeddings: bool = False):
    """The randomized in-memory model that :func:`make_hf_checkpoint` saves (fp32, eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    config = _make_config(family, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def make_hf_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    max_shard_size: str = "40KB",
    tie_word_embeddings: bool = False,
) -> Path:
    """Builds a tiny random ``family`` model with transformers' classes and ``save_pretrained``s it (fp32,
    sharded safetensors + ``model.safetensors.index.json``, hub key layout). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(family, seed=seed, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return out


# --------------------------------------------------------------------------------------------------- loading


def load_hf_model(path: str | Path):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=float32, attn_implementation='eager').eval()``.

    FP8 (``quant_method: fp8``) checkpoints come back as a plain fp32 model with dequantized weights:
    transformers dequantizes them at load time (``FineGrainedFP8Config(dequantize=True)``, which it also picks
    by itself on a machine without CUDA). Two transformers 5.24 limitations matter here:

    * the FP8 quantizer refuses to run without ``accelerate`` (a test dependency for that reason);
    * its load-time dequantization rejects weights whose shape is not a multiple of the block size (partial edge
      blocks, e.g. ``block=(24, 24)`` here): such checkpoints are dequantized here with
      :func:`dequantize_fp8_block` into a temporary fp32 copy, which is then loaded.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="eager")
    qc = _fp8_quantization_config(path)
    if qc is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    block = tuple(int(b) for b in qc.get("weight_block_size") or (128, 128))
    if _fp8_has_partial_blocks(path, block):
        with tempfile.TemporaryDirectory(prefix="emoe-fp8-deq-") as tmp:
            _write_dequantized_copy(path, Path(tmp), block)
            return AutoModelForCausalLM.from_pretrained(tmp, **kwargs).eval()

    from transformers import FineGrainedFP8Config

    kwargs["quantization_config"] = FineGrainedFP8Config(
        activation_scheme=qc.get("activation_scheme", "dynamic"), weight_block_size=block, dequantize=True
    )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _fp8_quantization_config(path: Path) -> dict | None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or None
    return qc if qc and qc.get("quant_method") == "fp8" else None


def _fp8_has_partial_blocks(path: Path, block: tuple[int, int]) -> bool:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):  # a weight and its scale may sit in different shards
        with safe_open(str(f), "pt") as so:
            shapes.update({name: so.get_slice(name).get_shape() for name in so.keys()})
    for name in shapes:
        if name.endswith("_scale_inv"):
            rows, cols = shapes[name.removesuffix("_scale_inv")][-2:]
            if rows % block[0] or cols % block[1]:
                return True
    return False


def _write_dequantized_copy(src: Path, dst: Path, block: tuple[int, int]) -> None:
    tensors = _read_checkpoint(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = t if scale is None else dequantize_fp8_block(t, scale, block)
    write_sharded_safetensors(out, dst, max_shard_bytes=1 << 40)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------------------------------- FP8

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Hub-layout names of the MiniMax-M2 weights that ship in FP8.
_FP8_MINIMAX_RE = re.compile(
    r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$|\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight$"
)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization as DeepSeek-V3 / MiniMax-M2 ship it.

    Returns ``(fp8 [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)])`` with
    ``scale_inv = amax(|block|) / 448`` and ``fp8 = (w / scale_inv).to(float8_e4m3fn)``.
    """
    b0, b1 = block
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    sr, sc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(sr * b0, sc * b1, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(sr, b0, sc, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    fp8 = q.reshape(sr * b0, sc * b1)[:rows, :cols].contiguous().to(torch.float8_e4m3fn)
    return fp8, scale_inv.contiguous()


def dequantize_fp8_block(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``fp8.float() * scale_inv`` broadcast per ``block`` (partial edge blocks allowed)."""
    b0, b1 = block
    rows, cols = fp8.shape
    s = scale_inv.to(torch.float32).repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return fp8.to(torch.float32) * s


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def write_sharded_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: str | Path, *, max_shard_bytes: int = 40_000
) -> list[str]:
    """Writes ``tensors`` as ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (greedy packing in key order, like save_pretrained). Returns the shard file names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def make_fp8_minimax_checkpoint(
    out_dir: str | Path, *, seed: int = 0, block: tuple[int, int] = (16, 16), vocab_size: int = 128
) -> Path:
    """A tiny minimax_m2 checkpoint whose attention q/k/v/o and expert w1/w2/w3 weights are stored as
    ``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` ([ceil(out/b0), ceil(in/b1)]), block-quantized like the
    released MiniMax-M2 / DeepSeek-V3 checkpoints. Everything else (embeddings, lm_head, norms, router gate,
    e_score_correction_bias) stays fp32. config.json carries the hub-style ``quantization_config``.

    With the default ``block=(16, 16)`` every quantized dimension (hidden 48, q/o 64, k/v 32, expert 32) is a
    multiple of the block, and :func:`load_hf_model` goes through transformers' own dequantization. Other block
    sizes (e.g. ``(24, 24)``) give partial edge blocks, as the hub's DeepSeek-V3 ``kv_a_proj_with_mqa`` (576 rows)
    has; transformers 5.24 cannot dequantize those, so :func:`load_hf_model` dequantizes them itself.
    """
    b0, b1 = int(block[0]), int(block[1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emoe-fp8-src-") as tmp:
        src = make_hf_checkpoint("minimax_m2", tmp, seed=seed, vocab_size=vocab_size, max_shard_size="1GB")
        tensors = _read_checkpoint(src)
        config = json.loads((src / "config.json").read_text())
        extra = [f for f in ("generation_config.json",) if (src / f).is_file()]
        for f in extra:
            shutil.copyfile(src / f, out / f)

    quantized: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        w = tensors[name]
        if _FP8_MINIMAX_RE.search(name):
            fp8, scale_inv = quantize_fp8_block(w, (b0, b1))
            quantized[name] = fp8
            quantized[name + "_scale_inv"] = scale_inv
        else:
            quantized[name] = w
    for old in out.glob("*.safetensors"):
        old.unlink()
    write_sharded_safetensors(quantized, out)

    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [b0, b1],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


__all__ = [
    "FAMILIES",
    "FAMILY_CONFIG_KWARGS",
    "build_hf_model",
    "dequantize_fp8_block",
    "load_hf_model",
    "make_fp8_minimax_checkpoint",
    "make_hf_checkpoint",
    "quantize_fp8_block",
    "write_sharded_safetensors",
]
