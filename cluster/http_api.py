"""The Frontend's OpenAI-compatible HTTP API: a FastAPI app over an injected `InferenceBackend`.

Endpoints: `GET /health` (always open), `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(tools, tool_choice, reasoning: cluster/openai_agent.py), Anthropic's `POST /v1/messages` and
`/v1/messages/count_tokens` (cluster/anthropic_api.py), and the tokenizer endpoints of
`cluster/http_tokenizer.py`.

Contract:
- Errors have OpenAI's shape `{"error": {"message", "type", "param", "code": null}}`. Statuses come from
  `cluster.errors.classify` (InvalidRequest 400, Overloaded 429, Unauthenticated 401); body validation
  errors (malformed JSON, wrong types, NaN / Infinity, missing fields) are 400 naming the field in `param`;
  anything unexpected is a logged 500 with a generic message. No error stops the app. Exceptions: a body
  over MAX_BODY_BYTES gets Starlette's plain-text 413; an error after a stream's headers went out is sent
  as a final `data: {"error": ...}` event without `[DONE]`.
- A `model` other than the served one is 400 `invalid_request_error` with param "model" (an omitted model
  means the served one). Unsupported OpenAI features (suffix, best_of)
  are 400 naming the field, never ignored; unknown fields are ignored.
- Logprobs (`cluster/openai_logprobs.py`) are the raw model's; completions' `echo` sends the prompt first
  (with its logprobs when `logprobs` is set: what lm-eval's loglikelihood reads).
- With `api_token`, every path except `/health` needs `Authorization: Bearer <token>` or `x-api-key: <token>`
  (else 401).
- A client that goes away, streaming or not, has its request cancelled at the backend
  (`backend.cancel(request_id)`, shielded from the handler's own cancellation); finished ones are not.
- Streams are SSE (`data: {json}\n\n` ... `data: [DONE]\n\n`); a chat stream's first chunk carries the
  role; `finish_reason` is the backend's; `stream_options.include_usage` adds a final usage chunk.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.anthropic_api import add_anthropic_routes
from cluster.anthropic_api import error_response as anthropic_error
from cluster.errors import Unauthenticated, classify, client_message
from cluster.http_stream import (
    ClientGone,
    EventStream,
    collect,
    release_backend,
    sse_events,
    unless_disconnected,
)
from cluster.http_tokenizer import add_tokenizer_routes
from cluster.openai_agent import (
    HARMONY,
    ToolSetup,
    choice_output_factory,
    forced_call_grammar,
    harmony_prompt,
    harmony_stop_ids,
    reasoning_format,
    template_messages,
    tool_format,
    tool_setup,
)
from cluster.openai_logprobs import LogprobFormat
from cluster.openai_schema import (
    ChatBody,
    CompletionBody,
    Reply,
    RequestBody,
    completion_prompts,
    invalid_detail,
    stop_strings,
)
from emoe.api import (
    GenerateRequest,
    GrammarSpec,
    InferenceBackend,
    InvalidRequest,
    SamplingParams,
    validate_budget,
    validate_prompt,
)
from emoe.fanout import MAX_N, choice, fan_out

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024 * 1024


def build_http_app(
    backend: InferenceBackend,
    tokenizer: Any,
    *,
    model_name: str,
    api_token: str | None = None,
    default_max_tokens: int = 16,
    default_temperature: float = 1.0,
    on_ignored: Callable[[list[str]], None] | None = None,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "auto",
) -> FastAPI:
    """The OpenAI-compatible app (see the module docstring). `tokenizer` needs `encode` and
        `apply_chat_template`. `default_max_tokens` applies when a request gives none, lowered to fit the
        model's `max_tokens_limit` and the context left after the prompt; `default_temperature` (OpenAI's 1.0)
        when it gives no temperature. `on_ignored(fields)` is told the unknown fields of each request (ignored,
    as vLLM does). `api_token=""` is refused (it would look set but guard nothing)."""
    if api_token is not None and not api_token:
        raise ValueError("api_token must be a non-empty string or None")
    api = _Api(
        backend,
        tokenizer,
        model_name,
        default_max_tokens,
        default_temperature,
        on_ignored,
        tool_call_parser,
        reasoning_parser,
    )
    app = FastAPI(title="elastic-moe", max_body_size=MAX_BODY_BYTES)
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    add_tokenizer_routes(app, tokenizer, backend.info, model_name)
    add_anthropic_routes(app, api)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(InvalidRequest, _on_error)  # raised by routes: answered, not re-raised
    app.add_exception_handler(Exception, _on_error)
    if api_token:
        app.add_middleware(_BearerAuth, token=api_token)
    return app


async def _health() -> dict[str, str]:
    return {"status": "ok"}


@dataclass
class _Api:
    backend: InferenceBackend
    tokenizer: Any
    model_name: str
    default_max_tokens: int
    default_temperature: float
    on_ignored: Callable[[list[str]], None] | None = None
    tool_call_parser: str = "auto"  # a format of emoe/tool_parsers.py, or auto: the model family's
    reasoning_parser: str = "auto"  # "think", "none", or auto: the model family's
    created: int = field(default_factory=lambda: int(time.time()))

    async def models(self) -> Response:
        try:
            info = self.backend.info()
        except Exception as exc:
            return _error_response(exc)
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "elastic-moe"}
        card |= {"max_model_len": info.max_context, "sampling_defaults": dict(info.sampling_defaults)}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        return await self._serve(body, request, Reply(False, f"cmpl-{uuid.uuid4().hex}", self.model_name))

    async def chat(self, body: ChatBody, request: Request) -> Response:
        return await self._serve(body, request, Reply(True, f"chatcmpl-{uuid.uuid4().hex}", self.model_name))

    async def _serve(self, body: RequestBody, request: Request, reply: Reply) -> Response:
        try:
            gens = await asyncio.to_thread(self._to_requests, body, reply)  # tokenizing takes a while
            chunks = fan_out(self.backend, gens)
        except Exception as exc:
            return _error_response(exc)
        try:
            first = await unless_disconnected(request, anext(chunks, None))
        except BaseException as exc:
            await release_backend(self.backend, reply.request_id, chunks, finished=False)
            if not isinstance(exc, Exception):
                raise
            return (
                Response(status_code=499)
                if isinstance(exc, ClientGone)
                else _error_response(exc, reply.request_id)
            )
        if first is None:  # a stream without chunks reads as one empty chunk (its usage: the prompt)
            first = gens[0].empty_chunk()
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            events = sse_events(
                reply, first, chunks, usage, lambda exc: _error_body(exc, reply.request_id)[1], len(gens)
            )
            release = functools.partial(release_backend, self.backend, reply.request_id, chunks)
            return EventStream(events, reply, release)
        return await self._whole(request, reply, first, chunks)

    async def _whole(self, request: Request, reply: Reply, first, chunks) -> Response:
        finished = False
        try:
            choices = await unless_disconnected(request, collect(first, chunks))
            finished = True
            return JSONResponse(reply.whole(choices))
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return _error_response(exc, reply.request_id)
        finally:
            await release_backend(self.backend, reply.request_id, chunks, finished)

    def _to_requests(self, body: RequestBody, reply: Reply) -> list[GenerateRequest]:
        """Checks `body` and builds the backend requests (`n` per prompt; choice k is `<id>/<k>`, seeded
        with seed + k); raises InvalidRequest naming the OpenAI field."""
        if body.model is not None and body.model != self.model_name:
            raise InvalidRequest(
                "model", f"{body.model[:200]!r} is not served here (serving {self.model_name!r})"
            )
        bad = body.unsupported()
        if bad:
            raise InvalidRequest(bad, "not supported by this server; leave it at its default")
        ignored = body.ignored_fields()
        if ignored and self.on_ignored is not None:
            self.on_ignored(ignored)
        info = self.backend.info()
        forced, markers, harmony = None, False, False
        if isinstance(body, ChatBody):
            setup = tool_setup(body.tools, body.tool_choice)
            setup.prior_calls = sum(len(m.tool_calls or []) for m in body.messages)
            tool_fmt = tool_format(info.family, self.tool_call_parser)
            prompts = [self._chat_prompt(body, info, setup)]
            reply.output = choice_output_factory(
                setup, tool_fmt, reasoning_format(info.family, self.reasoning_parser), prompts[0][1]
            )
            forced = forced_call_grammar(setup, tool_fmt)
            harmony = tool_fmt == HARMONY  # parsed from its text with markers; its end-of-action tokens stop
            markers = (setup.parse and tool_fmt is not None) or harmony
        else:
            prompts = completion_prompts(body.prompt, info, self.tokenizer)
        reply.n = n = 1 if body.n is None else body.n
        if isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise InvalidRequest("n", f"must be an integer in [1, {MAX_N}], got {n!r}")
        if reply.logprob_format is None and body.requested_logprobs() is not None:
            reply.logprob_format = functools.partial(LogprobFormat, self.tokenizer, reply.chat)
        requests = []
        for p, (ids, text) in enumerate(prompts):
            base = self._request(body, info, reply, ids, text, forced, markers, harmony)
            if getattr(body, "echo", False):
                reply.echo[p] = (text if text else self.tokenizer.decode(ids), list(ids))
            requests += [choice(base, p * n + k, len(prompts) * n) for k in range(n)]
        return requests

    def _request(
        self,
        body: RequestBody,
        info,
        reply: Reply,
        ids: list[int],
        text: str,
        forced: GrammarSpec | None = None,
        keep_markers: bool = False,
        harmony: bool = False,
    ) -> GenerateRequest:
        """`keep_markers`: tools are parsed from the text, so special tokens stay in it (the call markers
        of DeepSeek's and Kimi's formats are special tokens), as vLLM's tool parsers ask."""
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = info.default_max_tokens(self.default_max_tokens, len(ids))
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=info.sampling_default("temperature", self.default_temperature)
            if body.temperature is None
            else body.temperature,
            top_k=int(info.sampling_default("top_k", 0))
            if body.top_k is None
            else (body.top_k if body.top_k != -1 else 0),
            top_p=info.sampling_default("top_p", 1.0) if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop_strings(body.stop),
            stop_token_ids=tuple(body.stop_token_ids or ()) + (harmony_stop_ids() if harmony else ()),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            min_p=body.min_p,
            min_tokens=body.min_tokens,
            logit_bias=body.logit_bias_pairs(),
            skip_special_tokens=body.skip_special_tokens and not keep_markers,
            logprobs=body.requested_logprobs(),
            prompt_logprobs=body.requested_logprobs() if getattr(body, "echo", False) else None,
            structured=_constraint(body.grammar(), forced),
        )
        validate_budget(info, len(ids), sampling)
        return GenerateRequest(reply.request_id, tuple(ids), sampling, prompt_text=text)

    def _chat_prompt(self, body: ChatBody, info, setup: ToolSetup) -> tuple[list[int], str]:
        import jinja2

        messages = template_messages(body.messages)
        kwargs = dict(body.chat_template_kwargs or {})
        for reserved in ("messages", "tools", "add_generation_prompt"):
            if reserved in kwargs:
                raise InvalidRequest(f"chat_template_kwargs.{reserved}", "set by the request itself")
        tools = setup.tools if setup.mode != "none" else None
        if tool_format(info.family, self.tool_call_parser) == HARMONY:
            effort = body.reasoning_effort or kwargs.get("reasoning_effort") or "medium"
            return harmony_prompt(messages, tools, effort, info, self.tokenizer)
        if body.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", body.reasoning_effort)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, tools=tools, **kwargs
            )
            return validate_prompt(info, text, None, self.tokenizer.encode), text
        except jinja2.TemplateError as exc:
            raise InvalidRequest("messages", f"the chat template failed: {exc}") from exc
        except InvalidRequest as exc:
            raise InvalidRequest("messages", invalid_detail(exc)) from exc


def _constraint(asked: GrammarSpec | None, forced: GrammarSpec | None) -> GrammarSpec | None:
    if asked is not None and forced is not None:
        raise InvalidRequest("tool_choice", "a forced tool call cannot be combined with response_format")
    return asked or forced


def _error_json(status: int, kind: str, message: str, param: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error_body(exc: BaseException, request_id: str = "") -> tuple[int, dict]:
    """(HTTP status, OpenAI error JSON) for `exc`; unexpected errors are logged, their text never sent."""
    _, status, kind = classify(exc)
    if isinstance(exc, InvalidRequest):
        param = exc.field.removeprefix("sampling.")
        return _error_json(status, kind, f"{param}: {invalid_detail(exc)}", param)
    if status == 500:
        log.error("request %r failed", request_id, exc_info=exc)
        return _error_json(500, kind, "internal server error; see the server log")
    return _error_json(status, kind, client_message(exc) or kind)


def _error_response(exc: BaseException, request_id: str = "") -> JSONResponse:
    status, body = _error_body(exc, request_id)
    headers = (
        {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status == 429 else None
    )
    return JSONResponse(body, status_code=status, headers=headers)


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    status, body = _error_json(exc.status_code, kind, str(exc.detail))
    return JSONResponse(body, status_code=status, headers=exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the first bad field: `param` is its dotted path (e.g. "messages.0.content")."""
    errors = list(exc.errors())
    if not errors or errors[0].get("type") == "json_invalid":
        why = errors[0].get("ctx", {}).get("error", "") if errors else ""
        status, body = _error_json(400, "invalid_request_error", f"malformed JSON body: {why}")
        return JSONResponse(body, status_code=status)
    paths = [".".join(str(p) for p in e.get("loc", ())[1:]) for e in errors]
    message = "; ".join(
        f"{path or 'body'}: {e.get('msg', 'invalid')}" for path, e in zip(paths[:5], errors[:5], strict=True)
    )
    if not paths[0]:
        message += " (send a JSON object with Content-Type: application/json)"
    status, body = _error_json(400, "invalid_request_error", message, paths[0] or None)
    return JSONResponse(body, status_code=status)


OPEN_PATHS = frozenset({"/health", "/metrics"})


class _BearerAuth:
    """ASGI middleware: every HTTP path but /health and the read-only ops pages (/metrics, /dashboard...)
    needs `Authorization: Bearer <token>`, else 401. Dashboard actions check the admin token themselves."""

    def __init__(self, app, token: str):
        self.app, self._token = app, token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._open(scope) and not self._authorized(scope):
            error = Unauthenticated(
                "missing or invalid API token (Authorization: Bearer <token> or x-api-key)"
            )
            anthropic = scope.get("path", "").endswith(("/v1/messages", "/v1/messages/count_tokens"))
            await (anthropic_error(error) if anthropic else _error_response(error))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _open(scope) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        return path in OPEN_PATHS or path.startswith("/dashboard")

    def _authorized(self, scope) -> bool:
        headers = Headers(scope=scope)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token):
            return True
        key = headers.get("x-api-key")  # Anthropic's clients send the key here
        return key is not None and hmac.compare_digest(key.strip().encode(), self._token)
