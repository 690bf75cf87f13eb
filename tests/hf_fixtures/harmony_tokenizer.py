"""gpt-oss's tokenizer.json for tests: harmony's GPT-OSS encoding (tiktoken's o200k_base vocabulary plus the
harmony special tokens, ids 199998-201087), converted to a Hugging Face tokenizer with transformers'
`TikTokenConverter` — the form the release ships (openai/gpt-oss-*/tokenizer.json). The vocabulary comes
from `emoe.harmony.load_encoding`, which rebuilds it offline; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

# tiktoken's o200k_base split pattern (data, as tiktoken defines the encoding)
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
FIRST_SPECIAL, VOCAB_SIZE = 199998, 201088


def write_harmony_tokenizer(out_dir: str | Path) -> Path:
    """Writes tokenizer.json (and a tokenizer_config.json naming eos / pad) into `out_dir`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from emoe.harmony import O200K_FILE, load_encoding

    enc = load_encoding()
    vocab = Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / O200K_FILE
    specials = [enc.decode([i]) for i in range(FIRST_SPECIAL, VOCAB_SIZE)]
    tok = TikTokenConverter(
        vocab_file=str(vocab), pattern=O200K_PATTERN, extra_special_tokens=specials
    ).converted()
    for i, s in zip(range(FIRST_SPECIAL, VOCAB_SIZE), specials, strict=True):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{"eos_token": "<|return|>", "pad_token": "<|endoftext|>", "model_max_length": 131072}'
    )
    return out
