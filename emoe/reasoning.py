"""Separating a model's reasoning ("thinking") text from its answer content, streaming-safe.

The families served here that think (MiniMax-M2, DeepSeek-R1/V3, Kimi-K2, Qwen3, GLM-4.5) all write the
reasoning between `<think>` and `</think>`; the answer follows the closing tag. Some chat templates open the
think block in the generation prompt (DeepSeek-R1's "<think>\\n", MiniMax-M2, Qwen3's thinking mode), so the
generation starts inside reasoning without an opening tag, and a model may still emit a stray `<think>` of its
own at the start; it is dropped.

Rules, for the whole output:
- `<think>` at the start (after optional whitespace) opens reasoning; that whitespace and the tag are dropped.
  Elsewhere, once the answer has started, `<think>` is plain content text.
- Reasoning runs to the first `</think>`; one leading newline of reasoning is stripped, and the whitespace
  right after `</think>` is stripped from the content. Later `</think>` tags are content text.
- An output that ends while still in reasoning is all reasoning.

`ReasoningParser.feed` takes the generated text in any chunking (token by token, split inside a tag) and holds
back only what cannot be decided yet (a partial tag, whitespace at the start); for every chunking the deltas
concatenate to what `split_reasoning` gives for the whole output.
"""

from __future__ import annotations

from dataclasses import dataclass

# parser states
_PRE = "pre"  # at the start of the output, only whitespace seen: a `<think>` here opens reasoning
_STRAY = "stray"  # template opened the block; a `<think>` here (after whitespace) is a stray, dropped
_R_START = "r_start"  # reasoning just opened: one leading newline is stripped
_REASONING = "reasoning"  # inside reasoning, looking for the end tag
_POST_END = "post_end"  # end tag seen: whitespace is stripped until the content starts
_CONTENT = "content"  # answer content: everything passes through


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 when none)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Streams `<think>`...`</think>` reasoning apart from the content that follows it."""

    start: str = "<think>"
    end: str = "</think>"

    def __init__(self, prompt_text: str = "", starts_in_reasoning: bool | None = None):
        if starts_in_reasoning is None:
            starts_in_reasoning = self.prompt_opens_reasoning(prompt_text or "")
        self.starts_in_reasoning = bool(starts_in_reasoning)
        self._state = _STRAY if self.starts_in_reasoning else _PRE
        self._buf = ""

    @classmethod
    def prompt_opens_reasoning(cls, prompt_text: str) -> bool:
        """True when the prompt's last `start` tag comes after its last `end` tag (the template opened it)."""
        if not cls.start:
            return False
        return (
            prompt_text.rfind(cls.start) > prompt_text.rfind(cls.end) if cls.end else cls.start in prompt_text
        )

    @property
    def in_reasoning(self) -> bool:
        return self._state in (_STRAY, _R_START, _REASONING)

    def feed(self, text: str) -> ReasoningDelta:
        """New generated text, in any split; returns what can be emitted now."""
        if not text:
            return ReasoningDelta()
        if not isinstance(text, str):
            text = str(text)
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ReasoningDelta:
        """End of generation: emits everything still held back."""
        return self._run(final=True)

    def _run(self, final: bool) -> ReasoningDelta:
        out = ReasoningDelta()
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            state, buf = self._state, self._buf
            if state == _CONTENT:
                content.append(buf)
                self._buf = ""
                break
            if state == _POST_END:
                rest = buf.lstrip()
                self._buf = rest
                if not rest:
                    break
                self._state = _CONTENT
                continue
            if state == _REASONING:
                end = self.end
                i = buf.find(end) if end else -1
                if i >= 0:
                    reasoning.append(buf[:i])
                    self._buf = buf[i + len(end) :]
                    self._state = _POST_END
                    continue
                keep = 0 if final or not end else _partial_suffix(buf, end)
                reasoning.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                break
            if state == _R_START:
                if not final and buf in ("", "\r"):
                    break
                if buf.startswith("\r\n"):
                    self._buf = buf[2:]
                elif buf.startswith("\n"):
                    self._buf = buf[1:]
                self._state = _REASONING
                continue
            # _PRE or _STRAY: is there an opening tag at the start, after whitespace?
            start = self.start
            rest = buf.lstrip()
            if start and rest.startswith(start):
                self._buf = rest[len(start) :]
                self._state = _R_START
                continue
            if not final and start and len(rest) < len(start) and start.startswith(rest):
                break  # only whitespace and maybe a partial tag so far: undecided
            self._state = _CONTENT if state == _PRE else _R_START
        out.reasoning = "".join(reasoning)
        out.content = "".join(content)
        return out


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "think": ReasoningParser,
}

_FAMILY_PARSER: dict[str, str | None] = {
    "minimax_m2": "think",
    "deepseek_v3": "think",
    "kimi_k2": "think",
    "qwen3_moe": "think",
    "glm4_moe": "think",
    "glm4_moe_lite": "think",
    "mixtral": None,
    "qwen2_moe": None,
    "gpt_oss": None,  # harmony channels, parsed by openai-harmony elsewhere
}


def reasoning_parser_for_family(family: str) -> str | None:
    """The name (a key of REASONING_PARSERS) of the reasoning parser a model family needs, or None."""
    if not isinstance(family, str):
        return None
    return _FAMILY_PARSER.get(family.strip().lower().replace("-", "_"))


def split_reasoning(
    text: str, prompt_text: str = "", starts_in_reasoning: bool | None = None
) -> tuple[str, str]:
    """A whole output split into (reasoning, content)."""
    parser = ReasoningParser(prompt_text, starts_in_reasoning)
    a = parser.feed(text)
    b = parser.finish()
    return a.reasoning + b.reasoning, a.content + b.content
