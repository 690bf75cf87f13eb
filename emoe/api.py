"""The request/response types every layer shares (frontends, router, engine), and request validation.

Frontends (gRPC, HTTP) turn wire messages into `GenerateRequest`, call `validate_request`, and hand the
request to an `InferenceBackend`; errors are `InvalidRequest` (naming the field) or `Overloaded`, mapped to
gRPC status codes and HTTP statuses in one place (`cluster/errors.py`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class InvalidRequest(ValueError):
    """Bad input. `field` names the offending request field (e.g. "sampling.temperature")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # pickles with both arguments (Ray carries it from the router to the Frontend)
        return (type(self), (self.field, self.message))


class Overloaded(RuntimeError):
    """The server cannot take this request now (queue full); the client may retry later."""


class UnknownRequest(KeyError):
    """No request with this id is running (cancel of a finished or unknown request)."""


MAX_LOGPROBS = 20  # top-N logprobs per position, as OpenAI and vLLM allow
MAX_LOGIT_BIAS = 1024  # entries in a logit_bias map
MAX_GRAMMAR_CHARS = 64 * 1024  # a JSON schema, regex, grammar or the choices, in characters
GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_call")


@dataclass(frozen=True)
class GrammarSpec:
    """A structured-output constraint: `kind` is "json" (a JSON schema, as JSON text), "json_object" (any
    JSON object), "regex", "choice" (`choices`: exactly one of these strings) or "grammar" (EBNF, GBNF
    style) or "tool_call" (a forced tool call: JSON {"format", "tools": [{"name", "parameters"}]}, see
    emoe/tool_grammar.py). `field` names the request field it came from, for errors."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidRequest(self.field, f"unknown kind {self.kind!r}; one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.value, str) or any(not isinstance(c, str) for c in self.choices):
            raise InvalidRequest(self.field, "must be text")
        if self.kind in ("json", "regex", "grammar", "tool_call") and not self.value:
            raise InvalidRequest(self.field, f"{self.kind}: empty")
        if self.kind == "choice" and (not self.choices or not all(self.choices)):
            raise InvalidRequest(self.field, "choice: give a non-empty list of non-empty strings")
        size = len(self.value) + sum(len(c) for c in self.choices)
        if size > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(self.field, f"{self.kind}: {size} characters, more than {MAX_GRAMMAR_CHARS}")


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence samples. Logit processing runs in vLLM's order: logit_bias and min_tokens, the
    grammar's token mask, the penalties, then temperature, top_k, top_p and min_p. Logprobs are those of the
    raw distribution (the model's log-softmax before any of that), vLLM's default."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens below min_p * the top token's probability; 0 = off
    presence_penalty: float = 0.0  # [-2, 2], subtracted once from every token already generated
    frequency_penalty: float = 0.0  # [-2, 2], subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # > 0; tokens in the prompt or the output: logit / p if > 0 else * p
    min_tokens: int = 0  # eos and stop tokens are masked until this many tokens were generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    logprobs: int | None = None  # per generated token: its logprob and the top-N; None = off
    prompt_logprobs: int | None = None  # per prompt token (the first has none); None = off
    skip_special_tokens: bool = True  # in the returned text
    structured: GrammarSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(
                "sampling.max_tokens", f"must be a positive integer, got {self.max_tokens!r}"
            )
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(
                "sampling.temperature", f"must be a finite number >= 0, got {self.temperature!r}"
            )
        if not _int(self.top_k) or self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _int(self.seed):
            raise InvalidRequest("sampling.seed", f"must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("sampling.stop", "stop strings must be non-empty strings")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest("sampling.min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise InvalidRequest(f"sampling.{name}", f"must be in [-2, 2], got {value!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(
                "sampling.repetition_penalty", f"must be a number > 0, got {self.repetition_penalty!r}"
            )
        if not _int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(
                "sampling.min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(
                "sampling.logit_bias", f"{len(self.logit_bias)} entries, more than {MAX_LOGIT_BIAS}"
            )
        for tok, bias in self.logit_bias:
            if not _int(tok) or not _finite(bias) or not -100 <= bias <= 100:
                raise InvalidRequest(
                    "sampling.logit_bias", f"needs token id -> bias in [-100, 100], got {tok!r}: {bias!r}"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidRequest(
                    f"sampling.{name}", f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]  # already tokenized and validated by the frontend
    sampling: SamplingParams
    prompt_text: str = ""  # for logs and for detokenization context only
    resume_offset: int = 0  # output tokens already sent before this request (a resumed stream)

    def usage(self, num_output: int) -> tuple[int, int]:
        """(prompt_tokens, completion_tokens) of the original request once this one produced `num_output`
        tokens: a resumed request's prompt ends with the `resume_offset` tokens sent before it."""
        return len(self.prompt_token_ids) - self.resume_offset, self.resume_offset + num_output

    def empty_chunk(self) -> GenerateChunk:
        """A chunk with no output, carrying the usage before this request's first token."""
        prompt_tokens, completion_tokens = self.usage(0)
        return GenerateChunk(
            self.request_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )


@dataclass
class GenerateChunk:
    """New output of one request since the previous chunk. `finish_reason` is set on the last one only.

    `prompt_tokens` / `completion_tokens` are the usage so far of the request as the client sent it (a
    resumed stream counts the tokens sent before it); the engine sets them, every other layer reads them.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # one per entry of token_ids when the request asked for `sampling.logprobs`
    logprobs: list[TokenLogprob] | None = None
    # on the first chunk when the request asked for `sampling.prompt_logprobs`: one per prompt token, the
    # first None (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    index: int = 0  # which of a request's `n` choices (set by `fan_out`)
    stop_string: str | None = None  # on the last chunk: the stop string that ended it, if one did
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (at the request's first admission)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the raw distribution, its rank there (1 = the most likely), and the
    `top` N (token id, logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    vocab_size: int
    max_context: int  # prompt + output tokens
    max_tokens_limit: int  # largest max_tokens accepted
    eos_token_ids: tuple[int, ...]
    num_groups: int = 1
    transport: str = "local"
    # (name, value) pairs: the release's recommended temperature / top_p / top_k (generation_config.json),
    # applied where a request leaves them unset
    sampling_defaults: tuple[tuple[str, float], ...] = ()

    def sampling_default(self, name: str, fallback: float) -> float:
        """The model's default for sampling parameter `name`, else `fallback` (the API's own default)."""
        return dict(self.sampling_defaults).get(name, fallback)

    def default_max_tokens(self, default: int, prompt_len: int) -> int:
        """`default`, lowered to `max_tokens_limit` and to the context left after the prompt (at least 1)."""
        return min(default, self.max_tokens_limit, max(1, self.max_context - prompt_len))


class InferenceBackend(Protocol):
    """What a frontend needs: a streaming generate, cancellation, and the model's description.

    `generate` is an async generator (the frontends `aclose()` it when their client goes away); its chunks
    carry the usage (see `GenerateChunk`)."""

    def info(self) -> ModelInfo: ...

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]: ...

    async def cancel(self, request_id: str) -> None: ...


def validate_prompt(
    info: ModelInfo, prompt: str | None, prompt_token_ids: Sequence[int] | None, tokenize
) -> list[int]:
    """Exactly one of `prompt` / `prompt_token_ids`; returns the token ids, checked against the model."""
    has_text, has_ids = bool(prompt), bool(prompt_token_ids)
    if has_text and has_ids:
        raise InvalidRequest("prompt", "give either prompt or prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise InvalidRequest("prompt", "empty: give a non-empty prompt or prompt_token_ids")
    ids = list(tokenize(prompt)) if has_text else [int(t) for t in prompt_token_ids]
    if not ids:
        raise InvalidRequest("prompt", "tokenizes to no tokens")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequest(
            "prompt_token_ids", f"ids outside the vocabulary [0, {info.vocab_size}): {bad[:5]}"
        )
    if len(ids) >= info.max_context:
        raise InvalidRequest("prompt", f"{len(ids)} tokens exceeds the context length {info.max_context}")
    return ids


def validate_budget(info: ModelInfo, prompt_len: int, sampling: SamplingParams) -> None:
    if sampling.max_tokens > info.max_tokens_limit:
        raise InvalidRequest(
            "sampling.max_tokens", f"{sampling.max_tokens} exceeds the limit {info.max_tokens_limit}"
        )
    bad = [t for t in sampling.stop_token_ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequest("sampling.stop_token_ids", f"ids outside the vocabulary: {bad[:5]}")
    bad = [t for t, _ in sampling.logit_bias if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequest("sampling.logit_bias", f"token ids outside the vocabulary: {bad[:5]}")
    if prompt_len + sampling.max_tokens > info.max_context:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"prompt ({prompt_len}) + max_tokens ({sampling.max_tokens}) exceeds the context length "
            f"{info.max_context}",
        )
