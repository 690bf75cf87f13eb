import math

import pytest

from router import Engine
from router.engine.sampling import SamplingParams
from tests.conftest import write_tiny


def test_seed_makes_sampling_reproducible(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt) as engine:
        a = engine.generate([[1, 2, 3], [4]], max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
        b = engine.generate([[1, 2, 3], [4]], max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
        c = engine.generate([[1, 2, 3], [4]], max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)
        greedy = engine.generate([[1, 2, 3]], max_tokens=12, ignore_eos=True)
        top1 = engine.generate([[1, 2, 3]], max_tokens=12, temperature=5.0, top_k=1, seed=1, ignore_eos=True)
    assert a == b and a != c
    assert top1 == greedy  # top_k=1 is greedy whatever the temperature


def test_stop_tokens_end_a_sequence(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt) as engine:
        free = engine.generate([[1, 2, 3]], max_tokens=10, ignore_eos=True)[0]
        stop = free[3]
        cut = engine.generate([[1, 2, 3]], max_tokens=10, stop_token_ids=[stop], ignore_eos=True)[0]
    assert cut == free[: free.index(stop) + 1]


def test_generate_with_cache_equals_full_recompute(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt) as engine:
        prompt = [9, 8, 7, 6]
        out = engine.generate([prompt, [1]], max_tokens=6, ignore_eos=True)[0]
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(engine.logits([seq])[0][-1].argmax()))
    assert out == seq[len(prompt) :]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_tokens_are_named(tmp_path):
    with Engine.from_pretrained(write_tiny(tmp_path / "t")) as engine:
        with pytest.raises(ValueError, match=r"token_id_lists\[1\] has token ids outside the vocabulary"):
            engine.logits([[1], [5, 96]])
        with pytest.raises(ValueError, match=r"token_id_lists\[0\] is empty"):
            engine.generate([[]], max_tokens=2)
