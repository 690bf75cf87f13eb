"""The Frontend's gRPC server: `InferenceServicer` (cluster/grpc_api.py) behind bearer-token auth, with
requests parsed by us, plus grpc.health.v1.Health and server reflection, optionally over TLS."""

from __future__ import annotations

import hmac

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.errors import Unauthenticated
from cluster.grpc_api import InferenceServicer, abort
from emoe.v1 import inference_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "emoe.v1.Inference"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


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
    await abort(context, Unauthenticated("authorization: missing or wrong bearer token"))


_METHODS = {  # name -> (request type, response type, server streaming)
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    "Complete": (pb.GenerateRequest, pb.GenerateResponse, False),
    "GetModelInfo": (pb.GetModelInfoRequest, pb.ModelInfo, False),
    "Cancel": (pb.CancelRequest, pb.CancelResponse, False),
    "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse, False),
    "Detokenize": (pb.DetokenizeRequest, pb.DetokenizeResponse, False),
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
