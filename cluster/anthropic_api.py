"""Anthropic's Messages API over the same engine: `POST /v1/messages` (streamed or not) and
`POST /v1/messages/count_tokens`, for Claude-Code-style agent clients and the `anthropic` SDK.

A Messages request becomes the chat API's messages (text, `tool_use` -> an assistant's tool calls,
`tool_result` -> tool messages, `thinking` -> the previous turn's reasoning) and renders through the same
chat template; the output is split by the same reasoning and tool-call parsers (cluster/openai_agent.py)
into `thinking`, `text` and `tool_use` blocks. `tool_choice` any / tool are forced by the grammar as in
the chat API. Streams follow Anthropic's event sequence: message_start, then per block content_block_start
/ content_block_delta... / content_block_stop, message_delta (stop_reason, usage), message_stop. Errors
have Anthropic's shape `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from cluster.errors import classify, client_message
from cluster.http_stream import ClientGone, release_backend, unless_disconnected
from cluster.openai_agent import (
    HARMONY,
    ChoiceOutput,
    choice_output_factory,
    forced_call_grammar,
    harmony_prompt,
    harmony_stop_ids,
    reasoning_format,
    template_messages,
    tool_format,
    tool_setup,
)
from cluster.openai_schema import MAX_STOP_STRINGS, ChatMessage, structured_outputs_spec
from emoe.api import GenerateRequest, InvalidRequest, SamplingParams, validate_budget, validate_prompt

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
ERROR_TYPES |= {413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "abort": "end_turn"}


class MessagesBody(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: StrictInt | None = None
    messages: list[dict[str, Any]]
    system: Any = None  # str | [text blocks]
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted; reasoning is split out whenever the model reasons
    metadata: dict[str, Any] | None = None
    ignore_eos: bool = False  # extension (vLLM's)
    structured_outputs: dict[str, Any] | None = None  # extension (vLLM's): json | regex | choice | grammar


def add_anthropic_routes(app: FastAPI, api: Any) -> None:
    """Adds the Messages API to the OpenAI app; `api` is http_api's `_Api` (backend, tokenizer, parsers)."""

    async def messages(request: Request) -> Response:
        try:
            body = await _body(request)
            gen, output, stops = await asyncio.to_thread(_to_request, api, body)
        except Exception as exc:
            return error_response(exc)
        chunks = api.backend.generate(gen)
        try:
            first = await unless_disconnected(request, anext(chunks, None))
        except BaseException as exc:
            await release_backend(api.backend, gen.request_id, chunks, finished=False)
            if not isinstance(exc, Exception):
                raise
            return Response(status_code=499) if isinstance(exc, ClientGone) else error_response(exc)
        first = first or gen.empty_chunk()
        msg = _Message(gen, api.model_name, output(), stops)
        if body.stream:
            return _EventStream(msg.events(first, chunks), api.backend, gen.request_id, chunks, msg)
        finished = False
        try:
            chunk = first
            while chunk is not None:
                msg.add(chunk)
                chunk = await unless_disconnected(request, anext(chunks, None))
            finished = True
            return JSONResponse(msg.whole())
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc)
        finally:
            await release_backend(api.backend, gen.request_id, chunks, finished)

    async def count_tokens(request: Request) -> Response:
        try:
            body = await _body(request, counting=True)
            ids, _, _, _ = await asyncio.to_thread(_prompt, api, body)
            return JSONResponse({"input_tokens": len(ids)})
        except Exception as exc:
            return error_response(exc)

    app.add_api_route("/v1/messages", messages, methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])


async def _body(request: Request, counting: bool = False) -> MessagesBody:
    try:
        raw = await request.json()
    except ValueError as exc:
        raise InvalidRequest("body", f"malformed JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("body", "send a JSON object")
    try:
        body = MessagesBody.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise InvalidRequest(where, err.get("msg", "invalid")) from None
    if not counting and body.max_tokens is None:
        raise InvalidRequest("max_tokens", "required")
    if not body.messages:
        raise InvalidRequest("messages", "at least one message")
    return body


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise InvalidRequest(where, "must be text or a list of text blocks")


def chat_messages(body: MessagesBody) -> list[ChatMessage]:
    """Anthropic messages as the chat API's (system first; tool_result blocks as tool messages)."""
    out: list[ChatMessage] = []
    if body.system is not None:
        out.append(ChatMessage(role="system", content=_text_of(body.system, "system")))
    for i, m in enumerate(body.messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role", f"must be user or assistant, got {role!r}")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise InvalidRequest(f"messages.{i}.content", "must be a string or a list of content blocks")
        text, thinking, calls = [], [], []
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            where = f"messages.{i}.content.{j}"
            if kind == "text":
                text.append(str(b.get("text", "")))
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking" and role == "assistant":
                continue
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise InvalidRequest(where, "tool_use needs an id and a name")
                args = json.dumps(b.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": args}}
                )
            elif kind == "tool_result" and role == "user":
                if text:
                    out.append(ChatMessage(role="user", content="".join(text)))
                    text = []
                result = b.get("content", "")
                result = result if isinstance(result, str) else _text_of(result, f"{where}.content")
                out.append(ChatMessage(role="tool", tool_call_id=b.get("tool_use_id"), content=result))
            else:
                raise InvalidRequest(f"{where}.type", f"{kind!r} blocks are not supported in {role} messages")
        if role == "assistant":
            out.append(
                ChatMessage(
                    role="assistant",
                    content="".join(text) if text or not calls else None,
                    tool_calls=calls or None,
                    reasoning_content="".join(thinking) if thinking else None,
                )
            )
        elif text or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
            out.append(ChatMessage(role="user", content="".join(text)))
    return out


def _tools(body: MessagesBody) -> tuple[list[dict] | None, Any]:
    """Anthropic tools and tool_choice in the chat API's shape."""
    tools = None
    if body.tools is not None:
        tools = []
        for i, t in enumerate(body.tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise InvalidRequest(f"tools.{i}.name", "a tool needs a name")
            schema = t.get("input_schema", {"type": "object", "properties": {}})
            fn = {"name": t["name"], "description": t.get("description", ""), "parameters": schema}
            tools.append({"type": "function", "function": fn})
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind == "tool":
        return tools, {"type": "function", "function": {"name": choice.get("name")}}
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise InvalidRequest("tool_choice.type", f"must be auto, any, tool or none, got {kind!r}")
    return tools, mapped


def _prompt(api: Any, body: MessagesBody):
    import jinja2

    if body.model is not None and body.model != api.model_name:
        raise InvalidRequest("model", f"{body.model[:200]!r} is not served here (serving {api.model_name!r})")
    tools, choice = _tools(body)
    try:
        setup = tool_setup(tools, choice)
    except InvalidRequest as exc:  # name Anthropic's fields: tools.N.input_schema, not function.parameters
        raise InvalidRequest(
            exc.field.replace("function.parameters", "input_schema").replace("function.", ""),
            str(exc).split(": ", 1)[-1],
        ) from None
    messages = template_messages(chat_messages(body))
    setup.prior_calls = sum(len(m.get("tool_calls") or []) for m in messages)
    info = api.backend.info()
    if tool_format(info.family, api.tool_call_parser) == HARMONY:  # gpt-oss: harmony, not a template
        tools = setup.tools if setup.mode != "none" else None
        return (*harmony_prompt(messages, tools, "medium", info, api.tokenizer), setup, info)
    try:
        text = api.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=setup.tools if setup.mode != "none" else None
        )
    except jinja2.TemplateError as exc:
        raise InvalidRequest("messages", f"the chat template failed: {exc}") from exc
    try:
        ids = validate_prompt(info, text, None, api.tokenizer.encode)
    except InvalidRequest as exc:
        raise InvalidRequest("messages", str(exc).split(": ", 1)[-1]) from exc
    return ids, text, setup, info


def _to_request(api: Any, body: MessagesBody):
    ids, text, setup, info = _prompt(api, body)
    tool_fmt = tool_format(info.family, api.tool_call_parser)
    stops = tuple(body.stop_sequences or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop_sequences", f"at most {MAX_STOP_STRINGS}")
    sampling = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=info.sampling_default("temperature", 1.0)
        if body.temperature is None
        else body.temperature,
        top_p=info.sampling_default("top_p", 1.0) if body.top_p is None else body.top_p,
        top_k=int(info.sampling_default("top_k", 0)) if body.top_k is None else body.top_k,
        stop=stops,
        ignore_eos=body.ignore_eos,
        structured=_one_constraint(body, forced_call_grammar(setup, tool_fmt)),
        # call markers (and harmony's channels) stay in the text the parsers read
        skip_special_tokens=not ((setup.parse and tool_fmt is not None) or tool_fmt == HARMONY),
        stop_token_ids=harmony_stop_ids() if tool_fmt == HARMONY else (),
    )
    validate_budget(info, len(ids), sampling)
    output = choice_output_factory(setup, tool_fmt, reasoning_format(info.family, api.reasoning_parser), text)
    gen = GenerateRequest(f"msg_{uuid.uuid4().hex[:24]}", tuple(ids), sampling, prompt_text=text)
    return gen, (output or (lambda: ChoiceOutput(None, None))), stops


def _one_constraint(body: MessagesBody, forced):
    asked = structured_outputs_spec(body.structured_outputs) if body.structured_outputs is not None else None
    if asked is not None and forced is not None:
        raise InvalidRequest("tool_choice", "a forced tool call cannot be combined with structured_outputs")
    return asked or forced


class _Message:
    """One Messages response, built from the backend's chunks: content blocks in order of appearance."""

    def __init__(self, gen: GenerateRequest, model: str, output: ChoiceOutput, stops: tuple[str, ...]):
        self.gen, self.model, self.output, self.stops = gen, model, output, stops
        self.blocks: list[dict] = []  # {"type", ...} in order
        self.finished = False
        self.last = gen.empty_chunk()
        self._open: tuple[str, int] | None = None  # (kind, tool index) of the block being streamed

    def _head(self) -> dict:
        return {"id": self.gen.request_id, "type": "message", "role": "assistant", "model": self.model}

    def add(self, chunk) -> list[tuple[str, dict]]:
        """Feeds a chunk; the stream events it produces."""
        self.last = chunk
        delta = self.output.feed(chunk.text, final=bool(chunk.finish_reason), token_ids=chunk.token_ids)
        events: list[tuple[str, dict]] = []
        if delta.get("reasoning_content"):
            events += self._delta(
                "thinking", 0, {"type": "thinking_delta", "thinking": delta["reasoning_content"]}
            )
        if delta.get("content"):
            events += self._delta("text", 0, {"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls", ()):
            events += self._delta(
                "tool_use",
                call["index"],
                {"type": "input_json_delta", "partial_json": call["function"].get("arguments", "")},
                call,
            )
        if chunk.finish_reason:
            events += self._close()
            self.finished = True
        return events

    def _delta(self, kind: str, index: int, delta: dict, call: dict | None = None) -> list[tuple[str, dict]]:
        events = []
        if self._open != (kind, index):
            events += self._close()
            if kind == "tool_use":
                block = {
                    "type": "tool_use",
                    "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": call["function"].get("name", ""),
                    "input": {},
                }
                self.blocks.append({**block, "_json": ""})
            elif kind == "thinking":
                block = {"type": "thinking", "thinking": "", "signature": ""}
                self.blocks.append(dict(block))
            else:
                block = {"type": "text", "text": ""}
                self.blocks.append(dict(block))
            self._open = (kind, index)
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": block},
                )
            )
        b = self.blocks[-1]
        if kind == "tool_use":
            b["_json"] += delta["partial_json"]
        elif kind == "thinking":
            b["thinking"] += delta["thinking"]
        else:
            b["text"] += delta["text"]
        if kind != "tool_use" or delta["partial_json"]:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta},
                )
            )
        return events

    def _close(self) -> list[tuple[str, dict]]:
        if self._open is None:
            return []
        events = []
        if self._open[0] == "thinking":
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": len(self.blocks) - 1,
                        "delta": {"type": "signature_delta", "signature": ""},
                    },
                )
            )
        self._open = None
        events.append(("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1}))
        return events

    def stop(self) -> tuple[str, str | None]:
        if any(b["type"] == "tool_use" for b in self.blocks):
            return "tool_use", None
        if self.last.stop_string is not None:
            return "stop_sequence", self.last.stop_string
        return STOP_REASONS.get(self.last.finish_reason or "", "end_turn"), None

    def usage(self) -> dict:
        return {**_input_usage(self.last), "output_tokens": self.last.completion_tokens}

    def content(self) -> list[dict]:
        out = []
        for b in self.blocks:
            if b["type"] == "tool_use":
                try:
                    args = json.loads(b["_json"]) if b["_json"].strip() else {}
                except ValueError:
                    args = {"_raw": b["_json"]}
                out.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": args})
            else:
                out.append(dict(b))
        return out

    def whole(self) -> dict:
        reason, seq = self.stop()
        return {
            **self._head(),
            "content": self.content(),
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": self.usage(),
        }

    async def events(self, first, chunks):
        start = {**self._head(), "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**_input_usage(first), "output_tokens": 0}
        yield _sse("message_start", {"type": "message_start", "message": start})
        try:
            chunk = first
            while chunk is not None:
                for name, data in self.add(chunk):
                    yield _sse(name, data)
                chunk = await anext(chunks, None)
            reason, seq = self.stop()
            delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}}
            yield _sse("message_delta", {**delta, "usage": {"output_tokens": self.last.completion_tokens}})
            yield _sse("message_stop", {"type": "message_stop"})
        except Exception as exc:
            yield _sse("error", error_body(exc)[1])


def _input_usage(chunk) -> dict:
    """Anthropic's split of the prompt: `input_tokens` computed, `cache_read_input_tokens` served from the
    prefix cache (their sum is the prompt); caching is automatic, so nothing is a cache write."""
    cached = max(0, chunk.cached_tokens)
    return {
        "input_tokens": chunk.prompt_tokens - cached,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _sse(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    def __init__(self, events, backend, request_id: str, chunks, msg: _Message):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._backend, self._id, self._chunks, self._msg = backend, request_id, chunks, msg

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await release_backend(self._backend, self._id, self._chunks, self._msg.finished)


def error_body(exc: BaseException) -> tuple[int, dict]:
    _, status, _ = classify(exc)
    if isinstance(exc, InvalidRequest):
        message = str(exc)
    elif status == 500:
        log.error("Messages API request failed", exc_info=exc)
        message = "internal server error; see the server log"
    else:
        message = client_message(exc)
    return status, {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status)
