"""The Frontend's public gRPC API (`emoe.v1.Inference`, proto/emoe/v1/inference.proto) over an InferenceBackend.

Every request is converted and validated here (`emoe.api`) before the backend sees it; every error
becomes a status code through `cluster.errors.classify`, with a message that starts with the offending
field. Unexpected errors are logged and answered INTERNAL with a generic message; no handler error
takes the server down. A Generate or Complete call cancelled by its client (or lost to a disconnect)
cancels the backend request. The server around it (auth, health, reflection, TLS): cluster/grpc_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from cluster.errors import classify, client_message
from cluster.openai_agent import (
    HARMONY,
    ChoiceOutput,
    ToolSetup,
    choice_output_factory,
    forced_call_grammar,
    reasoning_format,
    tool_format,
    tool_setup,
)
from emoe.api import (
    GenerateChunk,
    GenerateRequest,
    GrammarSpec,
    InferenceBackend,
    InvalidRequest,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
    validate_budget,
    validate_prompt,
)
from emoe.fanout import MAX_N, choice, fan_out
from emoe.v1 import inference_pb2 as pb
from emoe.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256


class InferenceServicer(pb_grpc.InferenceServicer):
    """`emoe.v1.Inference` on top of `backend`; `tokenizer.encode(text) -> list[int]` tokenizes prompts.

    `default_max_tokens` applies when a request leaves `sampling.max_tokens` at 0; it is lowered to fit
    the model's `max_tokens_limit` and the context left after the prompt.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        tokenizer: Any,
        *,
        default_max_tokens: int = 16,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "auto",
    ):
        self.backend, self.tokenizer = backend, tokenizer
        self.default_max_tokens = default_max_tokens
        self.tool_call_parser, self.reasoning_parser = tool_call_parser, reasoning_parser
        self._outputs: dict[str, Any] = {}  # request id -> maker of its choices' ChoiceOutput (or None)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        reqs = await self._admit(request, context)
        try:
            async with contextlib.aclosing(self._responses(reqs)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            await self._cancel_backend(reqs[0].request_id)
            raise
        except Exception as e:
            await abort(context, e, reqs[0].request_id)

    async def Complete(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        reqs = await self._admit(request, context)
        request_id = reqs[0].request_id
        wholes = [pb.GenerateResponse(request_id=request_id, index=i) for i in range(len(reqs))]
        texts: list[list[str]] = [[] for _ in reqs]
        thoughts: list[list[str]] = [[] for _ in reqs]
        calls: list[dict[int, pb.ToolCallDelta]] = [{} for _ in reqs]
        try:
            async with contextlib.aclosing(self._responses(reqs)) as responses:
                async for part in responses:
                    whole = wholes[part.index]
                    thoughts[part.index].append(part.reasoning)
                    for c in part.tool_calls:
                        call = calls[part.index].setdefault(
                            c.index, pb.ToolCallDelta(index=c.index, id=c.id, name=c.name)
                        )
                        call.arguments += c.arguments
                    whole.token_ids.extend(part.token_ids)
                    whole.logprobs.extend(part.logprobs)
                    whole.prompt_logprobs.extend(part.prompt_logprobs)
                    texts[part.index].append(part.text)
                    if part.finish_reason:
                        whole.finish_reason = part.finish_reason
                        whole.usage.CopyFrom(part.usage)
        except asyncio.CancelledError:
            await self._cancel_backend(request_id)
            raise
        except Exception as e:
            await abort(context, e, request_id)
        for whole, parts, thought, made in zip(wholes, texts, thoughts, calls, strict=True):
            whole.text, whole.reasoning = "".join(parts), "".join(thought)
            whole.tool_calls.extend(made[i] for i in sorted(made))
        first = wholes[0]
        if len(wholes) > 1:
            first.choices.extend(wholes)
        return first

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        try:
            info = self.backend.info()
            return pb.ModelInfo(
                name=info.name,
                family=info.family,
                vocab_size=info.vocab_size,
                max_context=info.max_context,
                max_tokens_limit=info.max_tokens_limit,
                eos_token_ids=list(info.eos_token_ids),
                num_groups=info.num_groups,
                transport=info.transport,
                sampling_defaults=dict(info.sampling_defaults),
            )
        except Exception as e:
            await abort(context, e)

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        """Cancels a running request; NOT_FOUND when the backend raises UnknownRequest."""
        try:
            if not request.request_id:
                raise InvalidRequest("request_id", "empty")
            await self.backend.cancel(request.request_id)
        except Exception as e:
            await abort(context, e, request.request_id)
        return pb.CancelResponse()

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
            return pb.TokenizeResponse(token_ids=ids, max_context=self.backend.info().max_context)
        except Exception as e:
            await abort(context, e)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            vocab = self.backend.info().vocab_size
            bad = [t for t in request.token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest("token_ids", f"ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            return pb.DetokenizeResponse(text=self.tokenizer.decode(list(request.token_ids)))
        except Exception as e:
            await abort(context, e)

    async def _admit(self, request: pb.GenerateRequest, context) -> list[GenerateRequest]:
        """The validated request, one per choice of `sampling.n`, or the call aborted (INVALID_ARGUMENT
        naming the field)."""
        try:
            info = self.backend.info()
            n = request.sampling.n or 1
            if not 1 <= n <= MAX_N:
                raise InvalidRequest("sampling.n", f"must be in [1, {MAX_N}], got {n}")
            req = await asyncio.to_thread(self.to_request, request, info)  # tokenizing takes a while
            self._outputs[req.request_id] = self._output_factory(request, info, req)
            return [choice(req, k, n) for k in range(n)]
        except Exception as e:
            await abort(context, e, request.request_id[:MAX_REQUEST_ID_CHARS])

    def to_request(self, request: pb.GenerateRequest, info: ModelInfo) -> GenerateRequest:
        """Converts and validates a wire request against `info`; raises InvalidRequest naming the field.

        Fills in the defaults the proto documents (request_id, max_tokens; temperature, top_p and top_k
        from the model's sampling defaults where unset).
        """
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
        ids = validate_prompt(info, request.prompt, request.prompt_token_ids, self.tokenizer.encode)
        s = request.sampling
        default = info.default_max_tokens(self.default_max_tokens, len(ids))
        sampling = SamplingParams(
            max_tokens=s.max_tokens or default,
            temperature=float(s.temperature)
            if s.HasField("temperature")
            else info.sampling_default("temperature", 0.0),
            top_k=s.top_k if s.HasField("top_k") else int(info.sampling_default("top_k", 0)),
            top_p=float(s.top_p) if s.top_p else info.sampling_default("top_p", 1.0),
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
            frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            min_p=s.min_p,
            min_tokens=s.min_tokens,
            logit_bias=tuple(sorted(s.logit_bias.items())),
            skip_special_tokens=not s.keep_special_tokens and not self._parses_tools(request, info),
            logprobs=s.logprobs if s.HasField("logprobs") else None,
            prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
            structured=self._constraint(request, info),
        )
        validate_budget(info, len(ids), sampling)
        return GenerateRequest(request_id, tuple(ids), sampling, prompt_text=request.prompt)

    def _output_factory(self, request: pb.GenerateRequest, info: ModelInfo, req: GenerateRequest):
        """The per-choice output split (tool calls where the request has tools, reasoning where asked)."""
        if not request.tools and not request.separate_reasoning:
            return None
        setup = _tool_setup(request)
        reasoning = (
            reasoning_format(info.family, self.reasoning_parser) if request.separate_reasoning else None
        )
        fmt = tool_format(info.family, self.tool_call_parser)
        prompt = request.prompt or self.tokenizer.decode(
            list(req.prompt_token_ids), skip_special_tokens=False
        )
        return choice_output_factory(setup, fmt, reasoning, prompt)

    def _parses_tools(self, request: pb.GenerateRequest, info: ModelInfo) -> bool:
        """Tool calls are parsed from the text: its special tokens stay in it (call markers may be some)."""
        fmt = tool_format(info.family, self.tool_call_parser)
        return fmt == HARMONY or (_tool_setup(request).parse and fmt is not None)

    def _constraint(self, request: pb.GenerateRequest, info: ModelInfo) -> GrammarSpec | None:
        """sampling.structured, or the grammar of a forced tool call (not both)."""
        asked = _structured(request.sampling)
        setup = _tool_setup(request)
        forced = forced_call_grammar(setup, tool_format(info.family, self.tool_call_parser))
        if asked is not None and forced is not None:
            raise InvalidRequest(
                "tool_choice", "a forced tool call cannot be combined with sampling.structured"
            )
        return asked or forced

    async def _responses(self, reqs: list[GenerateRequest]) -> AsyncIterator[pb.GenerateResponse]:
        """One message per backend chunk with tokens or text, tagged with its choice's index; each
        choice's last has finish_reason and usage.

        Usage is the backend's (the last chunk's counts). A choice whose stream ends without a
        finish_reason (cancelled through Cancel) ends with finish_reason "abort" and the usage so far.
        """
        request_id = reqs[0].request_id.rsplit("/", 1)[0] if len(reqs) > 1 else reqs[0].request_id
        lasts = {i: r.empty_chunk() for i, r in enumerate(reqs)}
        done: set[int] = set()
        make = self._outputs.pop(request_id, None)
        outputs = {i: make() for i in range(len(reqs))} if make else {}
        stream = fan_out(self.backend, reqs)
        try:
            async for chunk in stream:
                lasts[chunk.index] = chunk
                if chunk.token_ids or chunk.text or chunk.finish_reason:
                    yield _response(request_id, chunk, outputs.get(chunk.index))
                if chunk.finish_reason:
                    done.add(chunk.index)
                    if len(done) == len(reqs):
                        return
            for i in sorted(set(lasts) - done):
                ended = dataclasses.replace(lasts[i], token_ids=[], text="", finish_reason="abort", index=i)
                yield _response(request_id, ended)
        finally:
            await stream.aclose()

    async def _cancel_backend(self, request_id: str) -> None:
        """Best effort: the request may already be finished or unknown."""
        try:
            await self.backend.cancel(request_id)
        except Exception as e:
            log.debug("cancel of %s after client cancellation: %r", request_id, e)


def _response(
    request_id: str, chunk: GenerateChunk, output: ChoiceOutput | None = None
) -> pb.GenerateResponse:
    text, reasoning, calls, finish = chunk.text, "", [], chunk.finish_reason or ""
    if output is not None:
        delta = output.feed(chunk.text, final=bool(chunk.finish_reason), token_ids=chunk.token_ids)
        text, reasoning = delta.get("content", ""), delta.get("reasoning_content", "")
        for c in delta.get("tool_calls", ()):
            fn = c["function"]
            calls.append(
                pb.ToolCallDelta(
                    index=c["index"], id=c.get("id", ""), name=fn.get("name", ""), arguments=fn["arguments"]
                )
            )
        if finish == "stop" and output.called:
            finish = "tool_calls"
    response = pb.GenerateResponse(
        token_ids=list(chunk.token_ids),
        text=text,
        finish_reason=finish,
        request_id=request_id,
        index=chunk.index,
        reasoning=reasoning,
        tool_calls=calls,
    )
    response.logprobs.extend(_logprob(e) for e in chunk.logprobs or ())
    response.prompt_logprobs.extend(_logprob(e) for e in (chunk.prompt_logprobs or [None])[1:])
    if chunk.finish_reason:
        response.usage.prompt_tokens = chunk.prompt_tokens
        response.usage.completion_tokens = chunk.completion_tokens
        response.usage.cached_tokens = max(0, chunk.cached_tokens)
    return response


def _logprob(e: TokenLogprob) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top]
    return pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob, rank=e.rank, top=top)


async def abort(context, exc: BaseException, request_id: str = "") -> NoReturn:
    """Aborts the call with `exc`'s status; unexpected errors are logged and get a generic message."""
    code, _, _ = classify(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request %r failed", request_id, exc_info=exc)
        message = f"internal error (request_id {request_id!r}); see the server log"
    else:
        message = client_message(exc)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _structured(s: pb.SamplingParams) -> GrammarSpec | None:
    """SamplingParams.structured as a GrammarSpec (None when unset)."""
    if not s.HasField("structured"):
        return None
    kind = s.structured.WhichOneof("kind")
    where = f"sampling.structured.{kind}"
    if kind is None:
        raise InvalidRequest(
            "sampling.structured", "set one of json_schema, json_object, regex, choice, grammar"
        )
    if kind == "json_schema":
        return GrammarSpec("json", s.structured.json_schema, field=where)
    if kind == "json_object":
        return GrammarSpec("json_object", field=where) if s.structured.json_object else None
    if kind == "choice":
        return GrammarSpec("choice", choices=tuple(s.structured.choice.choices), field=where)
    return GrammarSpec(kind, getattr(s.structured, kind), field=where)


def _tool_setup(request: pb.GenerateRequest) -> ToolSetup:
    """GenerateRequest.tools / tool_choice, checked (INVALID_ARGUMENT naming tools.N... or tool_choice)."""
    tools = []
    for i, t in enumerate(request.tools):
        try:
            params = (
                json.loads(t.parameters_json) if t.parameters_json else {"type": "object", "properties": {}}
            )
        except ValueError as exc:
            raise InvalidRequest(f"tools.{i}.parameters_json", f"not valid JSON: {exc}") from None
        tools.append(
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": params},
            }
        )
    choice: Any = request.tool_choice or "auto"
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:
        return tool_setup(tools, choice)
    except InvalidRequest as exc:
        field = exc.field.replace("function.parameters", "parameters_json").replace("function.", "")
        raise InvalidRequest(field, str(exc).split(": ", 1)[-1]) from None


def _output_factory(request: pb.GenerateRequest, info: ModelInfo, req: GenerateRequest):
    """The per-choice output split of a request (tool calls where it has tools, reasoning where asked)."""
    setup = _tool_setup(request)
    reasoning = reasoning_format(info.family) if request.separate_reasoning else None
    return choice_output_factory(
        setup, tool_format(info.family), reasoning, request.prompt or req.prompt_text
    )
