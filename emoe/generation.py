"""`generation_config.json`: the release's end-of-sequence ids and recommended sampling defaults.

MiniMax-M2 ships its eos only here (config.json has none) with temperature 1.0, top_p 0.95, top_k 40.
The defaults apply where a request leaves a parameter unset (as vLLM's `--generation-config auto` does;
`AppConfig.generation_config = "ignore"` turns that off); eos ids always apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GenerationDefaults:
        """The checkpoint's generation_config.json, or no defaults when it has none."""
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls()
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationDefaults:
        eos = raw.get("eos_token_id")
        ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            eos_token_ids=tuple(int(i) for i in ids),
            temperature=_number(raw, "temperature", float),
            top_p=_number(raw, "top_p", float),
            top_k=_number(raw, "top_k", int),
        )

    def sampling(self) -> dict[str, float | int]:
        """The sampling defaults the release recommends (only those it sets)."""
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}


def _number(raw: dict[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"generation_config.json: {key} must be a number, got {value!r}")
    return kind(value)
