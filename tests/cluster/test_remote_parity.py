"""Remote expert groups equal the in-process engine (logits within 1e-5, the same greedy tokens): every
family over gRPC with 4 groups and over torch.distributed with 3 (an uneven split); and for MiniMax-M2 the
whole sweep, G in {1, 2, 3, 4} on both transports. (The transports and the partition are
family-independent; what differs per family is the expert math each group runs.)"""

from __future__ import annotations

import pytest

from router import Engine
from tests.hf_fixtures import FAMILIES, make_hf_checkpoint

PROMPTS = [[5, 17, 33, 9, 100, 64, 3], [42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 90]]
SWEPT = "minimax_m2"
PER_FAMILY = [("grpc", 4), ("dist", 3)]
CASES = [(f, t, g) for f in FAMILIES for t, g in PER_FAMILY] + [
    (SWEPT, t, g) for t in ("grpc", "dist") for g in (1, 2, 3, 4) if (t, g) not in PER_FAMILY
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """family -> (checkpoint, in-process logits, in-process greedy tokens), made on first use."""
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            path = make_hf_checkpoint(family, tmp_path_factory.mktemp(family), seed=5)
            with Engine.from_pretrained(path) as engine:
                made[family] = (
                    path,
                    engine.logits(PROMPTS),
                    engine.generate(PROMPTS, max_tokens=12, ignore_eos=True),
                )
        return made[family]

    return get


@pytest.mark.parametrize("family, transport, num_groups", CASES)
def test_remote_equals_in_process(ray_cluster, references, family, transport, num_groups):
    path, want_logits, want_tokens = references(family)
    with Engine.from_pretrained(path, dispatcher=transport, num_groups=num_groups) as engine:
        got = engine.logits(PROMPTS)
        tokens = engine.generate(PROMPTS, max_tokens=12, ignore_eos=True)
        calls = engine.dispatcher.stats()["calls"]
    for a, b in zip(got, want_logits, strict=True):
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"{family} {transport} G={num_groups}: max abs logit error {err:.3g}"
    assert tokens == want_tokens
    assert calls > 0


def test_prefix_cached_blocks_over_grpc_equal_a_recompute(ray_cluster, references):
    """Automatic prefix caching with the experts behind gRPC: a request served from cached blocks has the
    logprobs of one computed in full (the KV is the router's; the expert groups only see the new tokens)."""
    import asyncio

    from tests.unit.test_prefix_cache import assert_same, cached_then_fresh

    path, _, _ = references(SWEPT)
    with Engine.from_pretrained(path, dispatcher="grpc", num_groups=2) as engine:
        got, want, hits = asyncio.run(cached_then_fresh(engine.spec, engine.model, engine.dispatcher))
        tokens_routed = sum(engine.dispatcher.stats()["tokens_per_group"].values())
    assert hits == 44 and tokens_routed > 0
    assert_same(got, want)
