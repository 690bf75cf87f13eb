"""Every family, G in {1, 2, 3, 4}, both transports: equal to the in-process engine."""

from __future__ import annotations

import pytest

from router import Engine
from tests.hf_fixtures import FAMILIES, make_hf_checkpoint

PROMPTS = [[5, 17, 33, 9, 100, 64, 3], [42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 90]]


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory):
    path = make_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=5)
    with Engine.from_pretrained(path) as engine:
        return path, engine.logits(PROMPTS), engine.generate(PROMPTS, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("transport", ["grpc", "dist"])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 4])
def test_remote_equals_in_process(ray_cluster, reference, transport, num_groups):
    path, want_logits, want_tokens = reference
    with Engine.from_pretrained(path, dispatcher=transport, num_groups=num_groups) as engine:
        got = engine.logits(PROMPTS)
        tokens = engine.generate(PROMPTS, max_tokens=12, ignore_eos=True)
        calls = engine.dispatcher.stats()["calls"]
    for a, b in zip(got, want_logits, strict=True):
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"{transport} G={num_groups}: max abs logit error {err:.3g}"
    assert tokens == want_tokens
    assert calls > 0
