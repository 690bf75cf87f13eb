"""Logprobs in OpenAI's two shapes, as vLLM returns them (issue 15, point 1).

Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; the top
dict holds the top-N and the sampled token. Chat: `{"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}]}`. The values are the raw model's log-softmax (vLLM's
default `raw_logprobs`), before penalties, bias and temperature. Token strings are `Tokenizer.token_text`
(a piece of a multi-byte character reads `bytes:\\xNN`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emoe.api import TokenLogprob
from emoe.tokenizer import Tokenizer


@dataclass
class LogprobFormat:
    tokenizer: Tokenizer
    chat: bool
    offset: int = 0  # completions' text_offset of the next token, in characters of the completion

    def __call__(
        self, entries: list[TokenLogprob], prompt: list[tuple[int, TokenLogprob | None]] = ()
    ) -> dict[str, Any]:
        """`entries` of generated tokens; `prompt` (completions' echo): (token id, entry or None) first."""
        if self.chat:
            return self._chat(entries)
        return self._completions([*prompt, *((e.token_id, e) for e in entries)])

    def _completions(self, items: list[tuple[int, TokenLogprob | None]]) -> dict[str, Any]:
        text = self.tokenizer.token_text
        tokens, offsets, values, tops = [], [], [], []
        for token_id, e in items:
            tokens.append(text(token_id))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
            values.append(None if e is None else e.logprob)
            if e is None:  # the first prompt token: nothing precedes it
                tops.append(None)
                continue
            top = {text(t): lp for t, lp in e.top}
            top.setdefault(tokens[-1], e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {
            "content": [
                {**self._item(e.token_id, e.logprob), "top_logprobs": [self._item(t, lp) for t, lp in e.top]}
                for e in entries
            ]
        }

    def _item(self, token_id: int, logprob: float) -> dict[str, Any]:
        t = self.tokenizer
        return {"token": t.token_text(token_id), "logprob": logprob, "bytes": list(t.token_bytes(token_id))}
