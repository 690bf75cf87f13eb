"""The torch.distributed transport of `RemoteDispatcher`: one point-to-point pair (gloo/NCCL) per replica.

Errors that a retry on another replica cannot fix (a request the replica refuses as malformed) raise
ValueError; everything else (dead peer, timeout, stale placement) raises TransportError and is retried.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from emoe import p2p
from router.dispatch.base import TransportError
from router.dispatch.remote import Transport


@dataclass
class DistConn:
    pg: Any
    store: Any
    lock: threading.Lock


class DistTransport:
    """Blocking point-to-point ops run on a thread pool, so all groups of a layer proceed at once.
    `timeout_s` bounds joining a pair and every send/recv on it (the process group's timeout)."""

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

    async def call(self, conn: DistConn, layer, version, x, local_ids, weights) -> torch.Tensor:
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
        if status == p2p.STATUS_PLACEMENT:  # being re-placed: another replica may hold it (as on gRPC)
            raise TransportError(f"expert replica holds another placement version than {version}")
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
