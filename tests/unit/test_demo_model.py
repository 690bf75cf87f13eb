"""The demo model: a MiniMax-M2 checkpoint transformers loads, with a tokenizer AutoTokenizer loads."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from emoe.demo import write_demo_model
from router import Engine
from tests.hf_fixtures import load_hf_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_tokenizer_loads_with_autotokenizer(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    text = "Hello world! café 東京 😀"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: every string round-trips
    assert len(tok) <= json.loads((demo_dir / "config.json").read_text())["vocab_size"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")


def test_transformers_loads_it_and_agrees(demo_dir):
    hf = load_hf_model(demo_dir)
    assert type(hf).__name__ == "MiniMaxM2ForCausalLM"
    prompt = [5, 200, 31, 999, 12]
    with Engine.from_pretrained(demo_dir, num_groups=2) as engine:
        ours = engine.logits([prompt])[0]
        gen = engine.generate([prompt], max_tokens=8, ignore_eos=True)[0]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        hf_gen = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert (ours - want).abs().max().item() <= 1e-4
    assert gen == hf_gen[0, len(prompt) :].tolist()


def test_same_seed_same_weights(tmp_path, demo_dir):
    again = write_demo_model(tmp_path / "again")
    for f in ("model.safetensors.index.json", "tokenizer.json"):
        assert (again / f).read_bytes() == (demo_dir / f).read_bytes()
    shards = sorted(p.name for p in demo_dir.glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes()


def test_hot_experts_bias_routing(tmp_path):
    path = write_demo_model(tmp_path / "hot", hot_experts=[3])
    with Engine.from_pretrained(path) as engine:
        gate = engine.model.layers[0].moe.gate
        x = torch.randn(64, engine.spec.hidden_size)
        ids, _ = gate(x)
    assert (ids == 3).any(dim=1).float().mean() > 0.9


def test_cli_demo_model_and_generate(tmp_path, capsys):
    assert main(["demo-model", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert main(["generate", "Once upon a time", "--model", str(tmp_path / "m"), "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "Once upon a time" in out and "5 tokens in" in out
    assert main(["demo-model", str(tmp_path / "x"), "--hot-experts", "99"]) == 2
    assert "hot expert ids [99]" in capsys.readouterr().err
