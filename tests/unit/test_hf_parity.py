"""The in-process engine equals Hugging Face transformers' own model classes, family by family."""

from __future__ import annotations

import pytest
import torch

from router import Engine
from tests.hf_fixtures import FAMILIES, load_hf_model, make_fp8_minimax_checkpoint, make_hf_checkpoint

PROMPTS = [[5, 17, 33, 9, 100, 64, 3], [42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 90, 91, 92]]


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    path = make_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    return request.param, path, load_hf_model(path)


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_logits_match_transformers(family_ckpt):
    family, path, hf = family_ckpt
    with Engine.from_pretrained(path, dtype="float32") as engine:
        ours = engine.logits(PROMPTS)
    assert [o.shape for o in ours] == [(len(p), 128) for p in PROMPTS]
    for prompt, got in zip(PROMPTS, ours, strict=True):
        want = hf_logits(hf, prompt)
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"{family}: max abs logit error {err:.3g} for prompt of length {len(prompt)}"


def test_greedy_generate_matches_transformers(family_ckpt):
    family, path, hf = family_ckpt
    with Engine.from_pretrained(path, dtype="float32") as engine:
        ours = engine.generate(PROMPTS, max_tokens=16)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert got == hf_greedy(hf, prompt, 16), f"{family}: greedy tokens differ for prompt {prompt}"


def test_expert_groups_in_process_do_not_change_logits(family_ckpt):
    _, path, _ = family_ckpt
    with (
        Engine.from_pretrained(path, num_groups=1) as one,
        Engine.from_pretrained(path, num_groups=3) as three,
    ):
        for a, b in zip(one.logits(PROMPTS), three.logits(PROMPTS), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_tied_embeddings(tmp_path):
    path = make_hf_checkpoint("mixtral", tmp_path / "tied", tie_word_embeddings=True)
    hf = load_hf_model(path)
    with Engine.from_pretrained(path) as engine:
        got = engine.logits([PROMPTS[0]])[0]
    assert (got - hf_logits(hf, PROMPTS[0])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("block", [(16, 16), (24, 24)], ids=["whole-blocks", "partial-blocks"])
def test_fp8_minimax_matches_dequantized_transformers(tmp_path, block):
    path = make_fp8_minimax_checkpoint(tmp_path / "fp8", block=block)
    hf = load_hf_model(path)
    with Engine.from_pretrained(path) as engine:
        ours = engine.logits(PROMPTS)
        gen = engine.generate(PROMPTS[:1], max_tokens=8)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert (got - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    assert gen[0] == hf_greedy(hf, PROMPTS[0], 8)
