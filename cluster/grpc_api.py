"""The Frontend's public gRPC API (`emoe.v1.Inference`, proto/emoe/v1/inference.proto) over an InferenceBackend.

Every request is converted and validated here (`emoe.api`) before the backend sees it; every error
becomes a status code through `cluster.errors.classify`, with a message that starts with the offending
field. Unexpected errors are logged and answered INTERNAL with a generic message; no handler error
takes the server down. A Generate or Complete call cancelled by its client (or lost to a disconnect)
cancels the backend request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.errors import Unauthenticated, classify
from emoe.api import (
    GenerateChunk,
    GenerateRequest,
    InferenceBackend,
    InvalidRequest,
    ModelInfo,
    SamplingParams,
    validate_budget,
    validate_prompt,
)
from emoe.v1 import inference_pb2 as pb
from emoe.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "emoe.v1.Inference"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_REQUEST_ID_CHARS = 256
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class InferenceServicer(pb_grpc.InferenceServicer):
    """`emoe.v1.Inference` on top of `backend`; `tokenizer.encode(text) -> list[int]` tokenizes prompts.

    `default_max_tokens` applies when a request leaves `sampling.max_tokens` at 0; it is lowered to fit
    the model's `max_tokens_limit` and the context left after the prompt.
    """

    def __init__(self, backend: InferenceBackend, tokenizer: Any, *, default_max_tokens: int = 16):
        self.backend, self.tokenizer = backend, tokenizer
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        req = await self._admit(request, context)
        try:
            async with contextlib.aclosing(self._responses(req)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            await self._cancel_backend(req.request_id)
            raise
        except Exception as e:
            await _abort(context, e, req.request_id)

    async def Complete(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        req = await self._admit(request, context)
        whole = pb.GenerateResponse(request_id=req.request_id)
        texts: list[str] = []
        try:
            async with contextlib.aclosing(self._responses(req)) as responses:
                async for part in responses:
                    whole.token_ids.extend(part.token_ids)
                    texts.append(part.text)
                    if part.finish_reason:
                        whole.finish_reason = part.finish_reason
                        whole.usage.CopyFrom(part.usage)
        except asyncio.CancelledError:
            await self._cancel_backend(req.request_id)
            raise
        except Exception as e:
            await _abort(context, e, req.request_id)
        whole.text = "".join(texts)
        return whole

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
            )
        except Exception as e:
            await _abort(context, e)

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        """Cancels a running request; NOT_FOUND when the backend raises UnknownRequest."""
        try:
            if not request.request_id:
                raise InvalidRequest("request_id", "empty")
            await self.backend.cancel(request.request_id)
        except Exception as e:
            await _abort(context, e, request.request_id)
        return pb.CancelResponse()

    async def _admit(self, request: pb.GenerateRequest, context) -> GenerateRequest:
        """The validated request, or the call aborted (INVALID_ARGUMENT naming the field)."""
        try:
            info = self.backend.info()
            return await asyncio.to_thread(self.to_request, request, info)  # tokenizing takes a while
        except Exception as e:
            await _abort(context, e, request.request_id[:MAX_REQUEST_ID_CHARS])

    def to_request(self, request: pb.GenerateRequest, info: ModelInfo) -> GenerateRequest:
        """Converts and validates a wire request against `info`; raises InvalidRequest naming the field.

        Fills in the defaults the proto documents (request_id, max_tokens, top_p).
        """
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
        ids = validate_prompt(info, request.prompt, request.prompt_token_ids, self.tokenizer.encode)
        s = request.sampling
        default = min(self.default_max_tokens, info.max_tokens_limit, max(1, info.max_context - len(ids)))
        sampling = SamplingParams(
            max_tokens=s.max_tokens or default,
            temperature=float(s.temperature),
            top_k=s.top_k,
            top_p=1.0 if s.top_p == 0 else float(s.top_p),
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
        )
        validate_budget(info, len(ids), sampling)
        return GenerateRequest(request_id, tuple(ids), sampling, prompt_text=request.prompt)

    async def _responses(self, req: GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """One message per backend chunk with tokens or text; the last has finish_reason and usage.

        Usage counts what this stream returned. A backend stream that ends without a finish_reason
        (cancelled through Cancel) ends with finish_reason "abort".
        """
        completion_tokens = 0
        stream = self.backend.generate(req)
        if inspect.isawaitable(stream):
            stream = await stream
        try:
            async for chunk in stream:
                completion_tokens += len(chunk.token_ids)
                if chunk.token_ids or chunk.text or chunk.finish_reason:
                    yield _response(req, chunk, completion_tokens)
                if chunk.finish_reason:
                    return
            yield _response(req, GenerateChunk(req.request_id, finish_reason="abort"), completion_tokens)
        finally:
            if hasattr(stream, "aclose"):
                await stream.aclose()

    async def _cancel_backend(self, request_id: str) -> None:
        """Best effort: the request may already be finished or unknown."""
        try:
            await self.backend.cancel(request_id)
        except Exception as e:
            log.debug("cancel of %s after client cancellation: %r", request_id, e)


def _response(req: GenerateRequest, chunk: GenerateChunk, completion_tokens: int) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        token_ids=list(chunk.token_ids),
        text=chunk.text,
        finish_reason=chunk.finish_reason or "",
        request_id=req.request_id,
    )
    if chunk.finish_reason:
        response.usage.prompt_tokens = len(req.prompt_token_ids)
        response.usage.completion_tokens = completion_tokens
    return response


async def _abort(context, exc: BaseException, request_id: str = "") -> NoReturn:
    """Aborts the call with `exc`'s status; unexpected errors are logged and get a generic message."""
    code, _, _ = classify(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request %r failed", request_id, exc_info=exc)
        message = f"internal error (request_id {request_id!r}); see the server log"
    elif isinstance(exc, KeyError) and exc.args:
        message = str(exc.args[0])  # str(KeyError) would quote it
    else:
        message = str(exc)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Inference calls without metadata `authorization: Bearer <token>` (UNAUTHENTICATED).

    Health and reflection stay open (load balancer and orchestrator probes carry no token).
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(got, str) and hmac.compare_digest(got.encode(), self._expected):
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny)
        return grpc.unary_unary_rpc_method_handler(_deny)


async def _deny(request: bytes, context) -> None:
    await _abort(context, Unauthenticated("authorization: missing or wrong bearer token"))


_METHODS = {  # name -> (request type, response type, server streaming)
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    "Complete": (pb.GenerateRequest, pb.GenerateResponse, False),
    "GetModelInfo": (pb.GetModelInfoRequest, pb.ModelInfo, False),
    "Cancel": (pb.CancelRequest, pb.CancelResponse, False),
}


def _inference_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The Inference service with requests parsed by us: bytes that are not a valid message get
    INVALID_ARGUMENT (gRPC's own deserializer would answer UNKNOWN)."""
    handlers = {}
    for name, (req_type, resp_type, streaming) in _METHODS.items():
        method = getattr(servicer, name)
        if streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _parsed_stream(req_type, method), response_serializer=resp_type.SerializeToString
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _parsed_unary(req_type, method), response_serializer=resp_type.SerializeToString
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def _parse(req_type, raw: bytes, context):
    try:
        return req_type.FromString(raw)
    except DecodeError as e:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {req_type.DESCRIPTOR.full_name}: {e}"
        )


def _parsed_unary(req_type, method):
    async def handle(raw: bytes, context):
        return await method(await _parse(req_type, raw, context), context)

    return handle


def _parsed_stream(req_type, method):
    async def handle(raw: bytes, context):
        async for response in method(await _parse(req_type, raw, context), context):
            yield response

    return handle


async def start_grpc_server(
    servicer: InferenceServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    api_token: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Starts a grpc.aio server in the running loop; returns it and the bound port (`port` 0: OS-chosen).

    Serves `servicer`, grpc.health.v1.Health (SERVING for "" and emoe.v1.Inference) and server
    reflection. TLS when `tls_cert` and `tls_key` (PEM) are both given; `api_token` requires
    `authorization: Bearer <api_token>` on Inference calls. Message size limits: MAX_MESSAGE_BYTES.
    Raises ValueError for half a TLS pair, RuntimeError when the address cannot be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")
    interceptors = [_BearerTokenInterceptor(api_token)] if api_token else []
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    server.add_generic_rpc_handlers((_inference_handler(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    try:
        if tls_cert is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot bind gRPC server to {address}: {e}") from e
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC server to {address}")
    await server.start()
    return server, bound
