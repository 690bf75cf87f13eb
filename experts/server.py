"""gRPC data-plane server of an expert-group replica: a `grpc.aio` server on its own event-loop thread.

Status codes: INVALID_ARGUMENT for a malformed request (named field), FAILED_PRECONDITION for a placement
version mismatch. Message size limits are set explicitly on the server and checked again per tensor.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import torch

from emoe.v1 import expert_pb2 as pb
from emoe.v1 import expert_pb2_grpc as pb_grpc
from emoe.wire import DTYPE_NAMES, GRPC_OPTIONS, WireError, decode, encode
from experts.service import ExpertGroupCore, PlacementMismatch

SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(self, core: ExpertGroupCore, replica_id: str, dtype: torch.dtype):
        self.core, self.replica_id, self.dtype = core, replica_id, dtype

    async def Forward(self, request: pb.ExpertForwardRequest, context) -> pb.ExpertForwardResponse:
        try:
            out = self._forward(request)
        except PlacementMismatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (WireError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ExpertForwardResponse(output=encode(out))

    async def ForwardStream(self, request_iterator, context):
        """One response per request, in order; a refused request answers with an error, the stream goes on."""
        async for request in request_iterator:
            try:
                out = self._forward(request)
            except PlacementMismatch as e:
                yield pb.ExpertForwardResponse(
                    call_id=request.call_id, error_code="FAILED_PRECONDITION", error=str(e)
                )
                continue
            except (WireError, ValueError) as e:
                yield pb.ExpertForwardResponse(
                    call_id=request.call_id, error_code="INVALID_ARGUMENT", error=str(e)
                )
                continue
            yield pb.ExpertForwardResponse(call_id=request.call_id, output=encode(out))

    def _forward(self, request: pb.ExpertForwardRequest) -> torch.Tensor:
        hidden = decode(request.hidden, "hidden", dtypes=("float32", "bfloat16", "float16"))
        ids = decode(request.local_ids, "local_ids", dtypes=("int32", "int64"))
        weights = decode(request.weights, "weights", dtypes=("float32",))
        # inline: a thread hop costs more than the compute of a typical call; calls are serialized
        return self.core.forward(request.layer, request.placement_version, hidden, ids, weights)

    async def Info(self, request, context) -> pb.ExpertInfo:
        store = self.core.store
        layers = sorted(store.slots)
        return pb.ExpertInfo(
            replica_id=self.replica_id,
            group=self.core.group,
            placement_version=self.core.placement_version,
            dtype=DTYPE_NAMES[self.dtype],
            hidden_size=self.core.hidden_size,
            layers=layers,
            slots=[store.num_slots(layer) for layer in layers],
            device=str(self.core.device),
        )


class GrpcExpertServer:
    """Runs the servicer on 127.0.0.1 (or `host`) at an OS-assigned port, in a background loop thread."""

    def __init__(self, servicer: ExpertServicer, host: str = "127.0.0.1", advertise: str | None = None):
        self.servicer, self.host, self.advertise = servicer, host, advertise or host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emoe-expert-grpc", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("gRPC expert server did not start")
        return f"{self.advertise}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ExpertServiceServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()
        self._ready.set()

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
        fut.result(timeout=grace_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
