"""The gRPC transport of `RemoteDispatcher` (grpc.aio, one long-lived stream per replica).

Errors that a retry on another replica cannot fix (a request the replica refuses as malformed) raise
ValueError; everything else (connection lost, deadline, dead peer, stale placement) raises TransportError
and is retried.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import grpc
import torch

from emoe.v1 import expert_pb2 as pb
from emoe.v1 import expert_pb2_grpc as pb_grpc
from emoe.wire import GRPC_OPTIONS, WireError, decode, encode
from router.dispatch.base import TransportError
from router.dispatch.remote import Transport

# ---- gRPC ---------------------------------------------------------------------------------------


class GrpcConn:
    """One channel to a replica and one long-lived `ForwardStream` on it.

    Calls are written in order under a lock and their futures queued in the same order; a reader task
    resolves them as responses arrive (the replica answers in request order). A stream that breaks or a
    call that times out fails every call in flight with TransportError, and the dispatcher reconnects.
    """

    def __init__(self, endpoint: str):
        self.channel = grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS)
        self.stub = pb_grpc.ExpertServiceStub(self.channel)
        self.stream = self.stub.ForwardStream()
        self.pending: deque[tuple[int, asyncio.Future]] = deque()
        self.write_lock = asyncio.Lock()
        self.next_id = 0
        self.broken: str | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def call(self, request: pb.ExpertForwardRequest, timeout_s: float) -> torch.Tensor:
        """The reply to `request`; the whole call (the wait for the write lock, the write, the reply) is
        bounded by `timeout_s`: a replica that accepts the connection but never answers (a frozen process)
        blocks a write as surely as a reply."""
        if self.broken:
            raise TransportError(self.broken)
        try:
            return await asyncio.wait_for(self._call(request), timeout_s)
        except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
            self._fail(f"no reply within {timeout_s}s")
            raise TransportError(f"no reply within {timeout_s}s") from None

    async def _call(self, request: pb.ExpertForwardRequest) -> torch.Tensor:
        fut = asyncio.get_running_loop().create_future()
        async with self.write_lock:
            if self.broken:
                raise TransportError(self.broken)
            self.next_id += 1
            request.call_id = self.next_id
            self.pending.append((self.next_id, fut))
            try:
                await self.stream.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                self._fail(f"stream write failed: {e}")
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a write whose call was cancelled locally, i.e. by
                # `_fail` when the reader saw the stream break: that is this connection failing, not
                # this task being cancelled (which is re-raised)
                if self.broken is None or _cancelling():
                    raise
                raise TransportError(self.broken) from None
        return await fut

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.stream.read()
                if resp is grpc.aio.EOF:
                    self._fail("stream closed by the replica")
                    return
                call_id, fut = self.pending.popleft()
                if resp.call_id != call_id:
                    self._fail(f"reply {resp.call_id} out of order (expected {call_id})")
                    return
                if fut.done():  # timed out meanwhile
                    continue
                if resp.error_code == "INVALID_ARGUMENT":
                    fut.set_exception(ValueError(f"expert replica refused the request: {resp.error}"))
                elif resp.error_code:
                    fut.set_exception(TransportError(f"{resp.error_code}: {resp.error}"))
                else:
                    try:
                        out = decode(resp.output, "output", dtypes=("float32", "bfloat16", "float16"))
                    except WireError as e:
                        fut.set_exception(TransportError(f"malformed response: {e}"))
                    else:
                        fut.set_result(out)
        except grpc.aio.AioRpcError as e:
            self._fail(f"{e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            self._fail("connection closed")
            raise
        except IndexError:
            self._fail("reply without a request")

    def _fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            self.stream.cancel()
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(TransportError(why))
                fut.exception()  # its caller may have timed out already: not an unretrieved exception

    async def close(self) -> None:
        self.reader.cancel()
        self._fail("connection closed")
        await self.channel.close()


def _cancelling() -> bool:
    """Whether the current task has been asked to cancel (Python 3.11+; on 3.10 assumed not)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())


async def _grpc_connect(info: dict[str, Any]) -> GrpcConn:
    return GrpcConn(info["grpc_endpoint"])


def _grpc_close(conn: GrpcConn) -> None:
    try:
        asyncio.get_running_loop().create_task(conn.close())
    except RuntimeError:  # no running loop: the channel is collected with the loop
        pass


def grpc_transport(call_timeout_s: float = 30.0) -> Transport:
    """gRPC to each replica's `ForwardStream`; a call without a reply within `call_timeout_s` fails over."""

    async def call(conn: GrpcConn, layer, version, x, local_ids, weights) -> torch.Tensor:
        req = pb.ExpertForwardRequest(
            layer=layer,
            placement_version=version,
            hidden=encode(x),
            local_ids=encode(local_ids.to(torch.int32)),
            weights=encode(weights.float()),
        )
        return await conn.call(req, call_timeout_s)

    return Transport("grpc", _grpc_connect, call, _grpc_close)
