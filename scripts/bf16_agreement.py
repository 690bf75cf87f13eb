"""How close bf16 is to transformers' bf16: greedy tokens over a fixed prompt set, family by family.

    .venv/bin/python scripts/bf16_agreement.py [--tokens 16] [--prompts 16]

For each family of tests/hf_fixtures (tiny random checkpoints written by transformers' own classes) both
engines run in bfloat16 (gates in fp32 where transformers keeps them there). Per family: how many prompts
give the identical greedy continuation and how many positions come before the first divergence; next to
it the same for transformers' bf16 against its own fp32, which is the noise of bf16 itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router import Engine  # noqa: E402
from tests.hf_fixtures import FAMILIES, make_hf_checkpoint  # noqa: E402


def hf_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(sequences identical, positions before the first divergence, summed)."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    before = sum(
        next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        for x, y in zip(a, b, strict=True)
    )
    return same, before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=16)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 24, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    total = len(prompts) * args.tokens
    print(
        "| family | ours bf16 = transformers bf16 (prompts) | positions before divergence | transformers bf16 vs fp32 |"
    )
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            path = make_hf_checkpoint(family, Path(tmp) / family, seed=3)
            hf16 = [hf_greedy(hf_model(path, torch.bfloat16), q, args.tokens) for q in prompts]
            hf32 = [hf_greedy(hf_model(path, torch.float32), q, args.tokens) for q in prompts]
            with Engine.from_pretrained(path, dtype="bfloat16") as engine:
                ours = engine.generate(prompts, max_tokens=args.tokens, ignore_eos=True)
            same, before = agreement(ours, hf16)
            ref_same, ref_before = agreement(hf16, hf32)
            print(
                f"| {family} | {same}/{len(prompts)} | {before}/{total} ({100 * before / total:.0f}%) "
                f"| {ref_same}/{len(prompts)}, {ref_before}/{total} ({100 * ref_before / total:.0f}%) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
