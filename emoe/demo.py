"""The demo model: a small MiniMax-M2-architecture checkpoint with RANDOM weights and a trained tokenizer.

Its outputs are meaningless text; it exists to exercise the whole system offline. Everything is derived
from a fixed seed, written as sharded safetensors in the hub's key layout with a `config.json` that
transformers loads, and a byte-level BPE tokenizer trained on a small embedded corpus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from emoe.layout import expected_tensors
from emoe.spec import ModelSpec

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS: dict[str, dict] = {
    # small enough to load in a second on a laptop CPU
    "demo": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        rotary_dim=16,
        num_local_experts=16,
        num_experts_per_tok=4,
        intermediate_size=256,
        vocab_size=1024,
    ),
    # MiniMax-M2 architecture scaled down for benchmarks (issue: performance)
    "bench-small": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        rotary_dim=32,
        num_local_experts=64,
        num_experts_per_tok=8,
        intermediate_size=512,
        vocab_size=32000,
    ),
}


def demo_config(preset: str = "demo", **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choices: {', '.join(PRESETS)}")
    cfg = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "tie_word_embeddings": False,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "scoring_func": "sigmoid",
        # fields the MiniMax-M2 release's config.json has, so transformers / vLLM read these files alike
        "use_routing_bias": True,
        "shared_intermediate_size": 0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_beta": 1.0,
        "use_mtp": False,  # no multi-token-prediction weights are written
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": None,
        "torch_dtype": "float32",
        **PRESETS[preset],
    }
    cfg.update(overrides)
    cfg["attn_type_list"] = [1] * cfg["num_hidden_layers"]  # every layer full attention, as released
    return cfg


def random_weights(
    spec: ModelSpec, seed: int, dtype: torch.dtype, hot_experts: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every name of the layout. `hot_experts` get a large gate bias."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(spec).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
            if hot_experts:
                t[list(hot_experts)] += 2.0  # above any unbiased sigmoid score: always chosen
        elif name.endswith(".gate.weight"):  # the router: large enough that routing depends on the token
            t = torch.randn(shape, generator=gen) * (4.0 / shape[-1] ** 0.5)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(
    out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_bytes: int = 32 * 2**20
) -> None:
    """Sharded safetensors + `model.safetensors.index.json`, as `save_pretrained` lays them out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def train_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Byte-level BPE trained on the embedded corpus; returns the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("emoe").joinpath("data/corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[0],
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return tok.get_vocab_size()


def write_demo_model(
    out_dir: str | Path,
    preset: str = "demo",
    seed: int = 0,
    dtype: str = "float32",
    hot_experts: Sequence[int] = (),
    **overrides,
) -> Path:
    """Writes the demo checkpoint and tokenizer into `out_dir` (created if needed); returns the path.

    `overrides` replace config fields of the preset (e.g. `num_local_experts=256` for a scaling sweep)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"unsupported dtype {dtype!r}; choices: {', '.join(dtypes)}")
    torch_dtype = dtypes[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(preset, torch_dtype=dtype, **overrides)
    spec = ModelSpec.from_config(cfg)
    bad = [e for e in hot_experts if not 0 <= e < spec.num_experts]
    if bad:
        raise ValueError(f"hot expert ids {bad} outside [0, {spec.num_experts})")
    train_tokenizer(out, cfg["vocab_size"])
    write_checkpoint(out, random_weights(spec, seed, torch_dtype, hot_experts), cfg)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    (out / "README.md").write_text(
        f"# elastic-moe demo model\n\nRANDOM weights (seed {seed}, preset {preset}): the text it writes is "
        "meaningless.\nMiniMax-M2 architecture, for exercising elastic-moe offline.\n"
    )
    return out
