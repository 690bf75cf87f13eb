"""The two remote transports of `RemoteDispatcher`: gRPC (grpc.aio) and torch.distributed pairs.

Errors that a retry on another replica cannot fix (a request the replica refuses as malformed) raise
ValueError; everything else (connection lost, deadline, dead peer) raises TransportError and is retried.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from emoe import p2p
from emoe.v1 import expert_pb2 as pb
from emoe.v1 import expert_pb2_grpc as pb_grpc
from emoe.wire import GRPC_OPTIONS, WireError, decode, encode
from router.remote import Transport, TransportError

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
        if self.broken:
            raise TransportError(self.broken)
        fut = asyncio.get_running_loop().create_future()
        async with self.write_lock:
            self.next_id += 1
            request.call_id = self.next_id
            self.pending.append((self.next_id, fut))
            try:
                await self.stream.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                self._fail(f"stream write failed: {e}")
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            self._fail(f"no reply within {timeout_s}s")
            raise TransportError(f"no reply within {timeout_s}s") from None

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

    async def close(self) -> None:
        self.reader.cancel()
        self._fail("connection closed")
        await self.channel.close()


async def _grpc_connect(info: dict[str, Any]) -> GrpcConn:
    return GrpcConn(info["grpc_endpoint"])


async def _grpc_call(conn: GrpcConn, layer, version, x, local_ids, weights, timeout_s) -> torch.Tensor:
    req = pb.ExpertForwardRequest(
        layer=layer,
        placement_version=version,
        hidden=encode(x),
        local_ids=encode(local_ids.to(torch.int32)),
        weights=encode(weights.float()),
    )
    return await conn.call(req, timeout_s)


def _grpc_close(conn: GrpcConn) -> None:
    try:
        asyncio.get_running_loop().create_task(conn.close())
    except RuntimeError:  # no running loop: the channel is collected with the loop
        pass


GRPC = Transport("grpc", _grpc_connect, _grpc_call, _grpc_close)


# ---- torch.distributed --------------------------------------------------------------------------


@dataclass
class DistConn:
    pg: Any
    store: Any
    lock: threading.Lock


class DistTransport:
    """Blocking point-to-point ops run on a thread pool, so all groups of a layer proceed at once."""

    def __init__(self, timeout_s: float = 30.0, max_threads: int = 32):
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_threads, thread_name_prefix="emoe-dist")

    def transport(self) -> Transport:
        return Transport("dist", self.connect, self.call, self.close)

    async def connect(self, info: dict[str, Any]) -> DistConn:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._connect, info)

    def _connect(self, info: dict[str, Any]) -> DistConn:
        host, port = info["dist_endpoint"].rsplit(":", 1)
        try:
            store = p2p.client_store(host, int(port), self.timeout_s)
            pair = store.add("pairs", 1) - 1
            store.set(f"join/{pair}", "1")
            pg = p2p.pair_group(store, pair, 0, info["dist_backend"], self.timeout_s)
        except Exception as e:  # noqa: BLE001 - refused, timed out, peer gone
            raise TransportError(f"cannot join {info['dist_endpoint']}: {e}") from e
        return DistConn(pg, store, threading.Lock())

    async def call(self, conn: DistConn, layer, version, x, local_ids, weights, timeout_s) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._call, conn, layer, version, x, local_ids, weights)

    def _call(self, conn: DistConn, layer, version, x, local_ids, weights) -> torch.Tensor:
        n, k = local_ids.shape
        dev, hidden = x.device, x.shape[1]
        header = torch.tensor([p2p.OP_FORWARD, layer, version, n, k, hidden, p2p.DTYPE_CODES[x.dtype]])
        payload = p2p.as_bytes(x, local_ids.to(dev, torch.int32), weights.to(dev, torch.float32))
        reply = torch.empty(p2p.STATUS_BYTES + n * hidden * x.dtype.itemsize, dtype=torch.uint8, device=dev)
        with conn.lock:
            try:
                p2p.send(conn.pg, header.to(dev), 1)
                p2p.send(conn.pg, payload, 1)
                p2p.recv(conn.pg, reply, 1)
            except Exception as e:  # noqa: BLE001 - gloo/NCCL errors: peer closed, timeout
                raise TransportError(str(e)) from e
        status = reply[: p2p.STATUS_BYTES].view(torch.int64).tolist()[0]
        if status == p2p.STATUS_PLACEMENT:
            raise ValueError(f"expert replica holds another placement version than {version}")
        if status != p2p.STATUS_OK:
            raise ValueError(f"expert replica refused the request (status {status})")
        return reply[p2p.STATUS_BYTES :].view(x.dtype).view(n, hidden)

    def close(self, conn: DistConn) -> None:
        """Tells the replica to end this pair when the stream is idle and healthy; drops it either way."""
        if conn.pg is not None and conn.lock.acquire(blocking=False):
            try:
                p2p.send(conn.pg, torch.tensor([p2p.OP_CLOSE, 0, 0, 0, 0, 0, 0]), 1)
            except Exception:  # noqa: BLE001 - already broken
                pass
            finally:
                conn.lock.release()
        conn.pg = None
        conn.store = None
