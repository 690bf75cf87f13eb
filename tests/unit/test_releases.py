"""Checkpoints shaped like the hub releases load and equal transformers (issue 14): MiniMax-M2's eos from
generation_config.json, DeepSeek-V3's FP8 + MTP layer + YaRN, Kimi-K2's model_type, GLM-4.5's MTP layer."""

from __future__ import annotations

import json
import logging

import pytest

from emoe.generation import GenerationDefaults
from emoe.spec import ModelSpec
from router import Engine
from tests.hf_fixtures import load_hf_model
from tests.hf_fixtures.releases import RELEASES, make_release
from tests.unit.test_hf_parity import hf_greedy, hf_logits

PROMPTS = [[(5 * i + 7) % 120 + 3 for i in range(24)], [42, 7, 9]]  # the first is past YaRN's original 16


@pytest.fixture(scope="module", params=RELEASES)
def release(request, tmp_path_factory):
    path, oracle = make_release(request.param, tmp_path_factory.mktemp("release"), seed=4)
    return request.param, path, load_hf_model(oracle)


def test_release_loads_and_equals_transformers(release, caplog):
    name, path, hf = release
    with caplog.at_level(logging.INFO, logger="router.model.loader"), Engine.from_pretrained(path) as engine:
        ours = engine.logits(PROMPTS)
        gen = engine.generate(PROMPTS[:1], max_tokens=8, ignore_eos=True)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        err = (got - hf_logits(hf, prompt)).abs().max().item()
        assert err <= 1e-4, f"{name}: max abs logit error {err:.3g}"
    assert gen[0] == hf_greedy(hf, PROMPTS[0], 8)[: len(gen[0])]
    has_mtp = json.loads((path / "config.json").read_text()).get("num_nextn_predict_layers")
    skipped = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(skipped) == (1 if has_mtp else 0), skipped  # one line naming what was skipped


def test_minimax_m2_stops_at_the_eos_of_generation_config(tmp_path):
    """MiniMax-M2's config.json has no eos_token_id; generation_config.json does. Pick as eos the 4th token
    greedy decoding produces, and generation must stop right there."""
    probe, oracle = make_release("MiniMaxAI/MiniMax-M2", tmp_path / "probe", seed=4)
    want = hf_greedy(load_hf_model(oracle), PROMPTS[1], 12)
    eos = want[3]
    path, _ = make_release("MiniMaxAI/MiniMax-M2", tmp_path / "release", seed=4, eos_token_id=eos)
    assert "eos_token_id" not in json.loads((path / "config.json").read_text())
    assert eos in ModelSpec.from_pretrained(path).eos_token_ids
    with Engine.from_pretrained(path) as engine:
        out = engine.generate(PROMPTS[1:], max_tokens=12)[0]
    assert out == want[: want.index(eos) + 1]
    defaults = GenerationDefaults.from_pretrained(path)
    assert defaults.sampling() == {"temperature": 1.0, "top_p": 0.95, "top_k": 40}
