"""Tokenizer (a `tokenizer.json` through the `tokenizers` library), chat template, incremental detokenizer.

The detokenizer emits text only once it is complete: a multi-byte character split across tokens is held
back until its last byte arrives, so streamed text never contains a broken character.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        self.path = path  # the checkpoint directory (for tools that load the tokenizer themselves)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self._tok = HFTokenizer.from_file(str(file))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = _template(cfg.get("chat_template"))
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():  # newer releases ship the template as its own file
            self.chat_template = jinja_file.read_text()
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included, for logprobs (vLLM's token strings). A token that
        is part of a multi-byte character reads as its bytes, `bytes:\\xe2\\x80`, as vLLM writes them."""
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if REPLACEMENT not in text:
            return text
        return "bytes:" + "".join(f"\\x{b:02x}" for b in self.token_bytes(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The token's bytes (byte-level BPE maps each byte to a printable character; undone here)."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self._tok.decode([int(token_id)], skip_special_tokens=False).encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders `messages` with the checkpoint's chat template (a plain role: content format without
        one), as transformers does: `tools`, `add_generation_prompt`, the special tokens, and any
        `chat_template_kwargs` (e.g. `enable_thinking`) as template variables; `raise_exception`, `tojson`
        and `strftime_now` available. A template error raises jinja2.TemplateError."""
        if not self.chat_template:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **kwargs,
            "messages": messages,
            "tools": tools or None,
            "add_generation_prompt": add_generation_prompt,
        }
        return _compiled(self.chat_template).render(**variables)

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def _template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named ones (the "default" is used)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(
            value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    # as transformers renders templates (sandboxed, blocks trimmed, loop controls); lenient undefined:
    # hub templates test optional message keys (`message.tool_calls`) by truthiness
    env = ImmutableSandboxedEnvironment(
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, printable character -> byte."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
        chars, extra = {}, 0
        for b in range(256):
            if b in printable:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        _BYTE_DECODER = chars
    return _BYTE_DECODER


_BYTE_DECODER: dict[str, int] | None = None


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a character.

    Decodes a short window (a few tokens of context before the unread ones) so the cost per token is
    constant; text is emitted when the window's decoding no longer ends in a replacement character.
    """

    CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT :])
        self.prefix = 0  # start of the context window
        self.read = len(self.ids)  # ids before this are already emitted as text
        self.text = ""

    def add(self, new_ids: Sequence[int]) -> str:
        """Appends `new_ids`; returns the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before) :]
            self.prefix, self.read = max(0, len(self.ids) - self.CONTEXT), len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a stream: whatever is left, replacement characters included."""
        rest = self.tok.decode(self.ids[self.prefix :], self.skip)[
            len(self.tok.decode(self.ids[self.prefix : self.read], self.skip)) :
        ]
        self.read = len(self.ids)
        self.text += rest
        return rest
