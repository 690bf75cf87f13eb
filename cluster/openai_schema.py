"""The OpenAI wire format the HTTP API speaks: request bodies, prompt / stop parsing, and the reply objects.

Request bodies ignore unknown fields and reject NaN / Infinity. Unsupported OpenAI features are listed per
body in `NEUTRAL` (field -> the values that ask for nothing); `RequestBody.unsupported` names the first
field asking for more, which the app turns into a 400.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from emoe.api import GenerateChunk, GrammarSpec, InvalidRequest, validate_prompt

MAX_STOP_STRINGS = 16
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class RequestBody(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (and counted: `ignored_fields`), as vLLM
    does; NaN / Infinity are rejected."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None  # extension; -1 means off (as in vLLM)
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Any = None  # str | list[str], checked by stop_strings
    stop_token_ids: list[StrictInt] | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None  # token id (as a string, OpenAI's form) -> bias
    repetition_penalty: float = 1.0  # extension (vLLM)
    min_p: float = 0.0  # extension (vLLM)
    min_tokens: StrictInt = 0  # extension (vLLM)
    skip_special_tokens: bool = True  # extension (vLLM)
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema
    structured_outputs: dict[str, Any] | None = None  # extension (vLLM): json | regex | choice | grammar

    # OpenAI features this server does not do: field -> the values that ask for nothing (else 400)
    NEUTRAL: ClassVar[dict[str, tuple]] = {}

    def unsupported(self) -> str | None:
        """The first field that asks for an unsupported feature, if any."""
        return next((name for name, ok in self.NEUTRAL.items() if getattr(self, name) not in ok), None)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Top-N logprobs per generated token, or None (completions' `logprobs`; chat overrides)."""
        return getattr(self, "logprobs", None)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs; keys must be token ids, values numbers."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                tok = int(key)
            except ValueError:
                raise InvalidRequest("logit_bias", f"keys are token ids, got {key[:40]!r}") from None
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise InvalidRequest("logit_bias", f"the bias of {tok} is not a number: {bias!r}")
            pairs.append((tok, float(bias)))
        return tuple(pairs)

    def grammar(self) -> GrammarSpec | None:
        """The structured-output constraint of `response_format` or vLLM's `structured_outputs`, if any."""
        if self.response_format is not None and self.structured_outputs is not None:
            if self.response_format.get("type", "text") != "text":
                raise InvalidRequest(
                    "structured_outputs", "give response_format or structured_outputs, not both"
                )
        if self.structured_outputs is not None:
            return structured_outputs_spec(self.structured_outputs)
        if self.response_format is not None:
            return response_format_spec(self.response_format)
        return None

    def ignored_fields(self) -> list[str]:
        """Fields this server does not know (sent by clients and benchmark tools); they change nothing."""
        return sorted(self.model_extra or {})


class CompletionBody(RequestBody):
    prompt: Any = None  # str | list[int], or a batch of exactly one of those
    logprobs: StrictInt | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None
    NEUTRAL = {
        **RequestBody.NEUTRAL,
        "suffix": (None, ""),
        "best_of": (None, 1),
    }


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # null for an assistant turn that only calls tools
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = (
        None  # an assistant's calls: {id, type, function: {name, arguments}}
    )
    tool_call_id: str | None = None  # a tool result: the call it answers
    reasoning: str | None = None  # a previous assistant turn's reasoning (templates that need it render it)
    reasoning_content: str | None = None  # the same, under its older name

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        """OpenAI's list-of-parts content: text parts are joined; any other part is an error."""
        if not isinstance(value, list):
            return value
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            raise ValueError("only text content parts are supported")
        return "".join(p["text"] for p in value)


class ChatBody(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # low | medium | high (gpt-oss's harmony system message)
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM): template variables
    add_generation_prompt: bool = True  # extension (vLLM)
    continue_final_message: bool = False  # extension (vLLM)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs", "needs logprobs: true")
            return None
        return self.top_logprobs or 0


def response_format_spec(fmt: dict[str, Any]) -> GrammarSpec | None:
    """OpenAI's `response_format`: {"type": "text"} (nothing), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", field="response_format")
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        where = "response_format.json_schema"
        if not isinstance(inner, dict):
            raise InvalidRequest(where, "must be an object with a `schema`")
        schema = inner.get("schema", inner.get("json_schema"))
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where}.schema", "must be a JSON schema object")
        return GrammarSpec("json", json.dumps(schema), field=f"{where}.schema")
    raise InvalidRequest("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")


STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs_spec(so: dict[str, Any]) -> GrammarSpec | None:
    """vLLM's `structured_outputs`: exactly one of json (a schema, object or text), regex, choice (a list
    of strings), grammar (EBNF) or json_object (true)."""
    unknown = sorted(set(so) - set(STRUCTURED_KEYS) - {"disable_any_whitespace", "disable_fallback"})
    if unknown:
        raise InvalidRequest(f"structured_outputs.{unknown[0]}", "not supported by this server")
    given = [k for k in STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(
            "structured_outputs", f"give exactly one of {', '.join(STRUCTURED_KEYS)}; got {len(given)}"
        )
    key = given[0]
    value, where = so[key], f"structured_outputs.{key}"
    if key == "json":
        if isinstance(value, dict | bool):
            value = json.dumps(value)
        if not isinstance(value, str):
            raise InvalidRequest(where, "must be a JSON schema (an object or its JSON text)")
        return GrammarSpec("json", value, field=where)
    if key == "json_object":
        return GrammarSpec("json_object", field=where)
    if key == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRequest(where, "must be a list of strings")
        return GrammarSpec("choice", choices=tuple(value), field=where)
    if not isinstance(value, str):
        raise InvalidRequest(where, "must be a string")
    return GrammarSpec(key, value, field=where)


MAX_PROMPTS = 64  # prompts in one batched completions request


def completion_prompts(prompt: Any, info, tokenizer) -> list[tuple[list[int], str]]:
    """A string, a list of token ids, or a batch (list) of either -> [(ids, prompt text)] per prompt."""
    batch = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str | list) for p in prompt)
    prompts = prompt if batch else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"a batch of {len(prompts)} prompts, more than {MAX_PROMPTS}")
    out = []
    for i, p in enumerate(prompts):
        where = f"prompt[{i}]" if batch else "prompt"
        if p is None or isinstance(p, str):
            try:
                out.append((validate_prompt(info, p, None, tokenizer.encode), p or ""))
            except InvalidRequest as exc:
                raise InvalidRequest(where, invalid_detail(exc)) from exc
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            try:
                out.append((validate_prompt(info, None, p, tokenizer.encode), ""))
            except InvalidRequest as exc:
                raise InvalidRequest(where, invalid_detail(exc)) from exc
        else:
            raise InvalidRequest(where, "must be a string or a list of token ids")
    return out


def stop_strings(stop: Any) -> tuple[str, ...]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(stops)


def invalid_detail(exc: InvalidRequest) -> str:
    """An InvalidRequest's message without its `field: ` prefix."""
    return str(exc).removeprefix(f"{exc.field}: ")


@dataclass
class Reply:
    """One response's identity and its OpenAI JSON objects. Choice `index` = prompt * n + sample."""

    chat: bool
    request_id: str
    model: str
    finished: bool = False  # the backend stream ended; nothing to cancel
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1  # choices per prompt
    logprob_format: Callable[[], Callable[..., dict]] | None = None  # a formatter per choice, when asked
    echo: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # prompt -> (text, ids)
    # chat: a maker of the per-choice split into reasoning / content / tool calls (cluster/openai_agent.py)
    output: Callable[[], Any] | None = None
    _outputs: dict[int, Any] = field(default_factory=dict)
    _formats: dict[int, Callable[..., dict]] = field(default_factory=dict)
    _echoed: set[int] = field(default_factory=set)

    def _envelope(self, kind: str, choices: list[dict], **extra: Any) -> dict:
        head = {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}

    def _logprobs(self, index: int, entries, prompt_entries=None) -> dict | None:
        if self.logprob_format is None:
            return None
        fmt = self._formats.setdefault(index, self.logprob_format())
        echo, prompt = self.echo.get(index // self.n), ()
        if echo is not None and prompt_entries is not None:
            prompt = list(zip(echo[1], prompt_entries, strict=True))
        return fmt(entries or [], prompt)

    def echo_pending(self, index: int) -> bool:
        return index // self.n in self.echo and index not in self._echoed

    def _echo_text(self, index: int) -> str:
        """Completions' echo: the prompt's text, once per choice (its first event, or the whole reply)."""
        if not self.echo_pending(index):
            return ""
        self._echoed.add(index)
        return self.echo[index // self.n][0]

    def role_chunk(self, index: int) -> dict:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._envelope("chat.completion.chunk", [{**choice, "finish_reason": None}])

    def _split(self, index: int):
        if self.output is None:
            return None
        if index not in self._outputs:
            self._outputs[index] = self.output()
        return self._outputs[index]

    def _finish(self, index: int, reason: str | None) -> str | None:
        """finish_reason: "tool_calls" where the choice called a tool and ended by itself."""
        split = self._split(index)
        return "tool_calls" if reason == "stop" and split is not None and split.called else reason

    def chunk(self, c: GenerateChunk) -> dict | None:
        """The stream event of a backend chunk, or None when it has nothing to send yet (text the chat
        output parsers hold back until they know whether it is markup)."""
        lp = self._logprobs(c.index, c.logprobs, c.prompt_logprobs)
        if not self.chat:
            text = self._echo_text(c.index) + c.text
            choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
            return self._envelope("text_completion", [choice])
        split = self._split(c.index)
        if split is None:
            delta = {"content": c.text} if c.text else {}
        else:
            delta = split.feed(c.text, final=bool(c.finish_reason), token_ids=c.token_ids)
            if not delta and not c.finish_reason and not lp:
                return None
        finish = self._finish(c.index, c.finish_reason)
        choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return self._envelope("chat.completion.chunk", [choice])

    def usage(self, lasts: dict[int, GenerateChunk]) -> dict:
        """OpenAI's usage object from the backend's counts on each choice's last chunk (a prompt counts
        once however many choices it has)."""
        prompt = sum(c.prompt_tokens for i, c in lasts.items() if i % self.n == 0)
        completion = sum(c.completion_tokens for c in lasts.values())
        cached = sum(max(0, c.cached_tokens) for i, c in lasts.items() if i % self.n == 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self, lasts: dict[int, GenerateChunk]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage=self.usage(lasts))

    def whole(self, choices: dict[int, tuple]) -> dict:
        """`choices`: index -> (text, last chunk, logprob entries, prompt logprob entries or None, ids)."""
        out = []
        for index in sorted(choices):
            text, last, entries, prompt, ids = choices[index]
            lp = self._logprobs(index, entries, prompt)
            finish = last.finish_reason
            if self.chat:
                split = self._split(index)
                if split is None:
                    body = {"message": {"role": "assistant", "content": text}}
                else:
                    split.feed(text, final=True, token_ids=ids)
                    body = {"message": split.message()}
                    finish = self._finish(index, finish)
            else:
                body = {"text": self._echo_text(index) + text}
            out.append({"index": index, **body, "logprobs": lp, "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return self._envelope(kind, out, usage=self.usage({i: c[1] for i, c in choices.items()}))
