"""torch.distributed data-plane server of an expert-group replica (protocol in `emoe.p2p`).

An acceptor thread waits for routers to join; each pair is served by its own thread, one call at a time.
A malformed header gets a status reply and then the pair is closed (its byte stream can no longer be
trusted); the replica itself keeps serving every other pair.
"""

from __future__ import annotations

import logging
import threading

import torch

from emoe import p2p
from experts.service import ExpertGroupCore, PlacementMismatch

log = logging.getLogger(__name__)


class DistExpertServer:
    def __init__(self, core: ExpertGroupCore, host: str = "127.0.0.1", timeout_s: float = 30.0):
        self.core, self.host, self.timeout_s = core, host, timeout_s
        self.backend = p2p.backend_for(core.device)
        self._store = p2p.host_store(host, timeout_s)
        self.port = self._store.port
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> str:
        t = threading.Thread(target=self._accept, name="emoe-dist-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        pair = 0
        while not self._stop.is_set():
            if not self._store.check([f"join/{pair}"]):
                self._stop.wait(0.02)
                continue
            t = threading.Thread(target=self._serve_pair, args=(pair,), name=f"emoe-dist-{pair}", daemon=True)
            t.start()
            self._threads.append(t)
            pair += 1

    def _serve_pair(self, pair: int) -> None:
        try:
            pg = p2p.pair_group(self._store, pair, 1, self.backend, self.timeout_s)
            while not self._stop.is_set() and self._serve_one(pg):
                pass
        except Exception as e:  # noqa: BLE001 - the router went away or broke the stream
            log.info("dist pair %d closed: %s", pair, e)

    def _serve_one(self, pg) -> bool:
        dev = self.core.device
        header = p2p.recv(pg, torch.empty(p2p.HEADER, dtype=torch.int64, device=dev), 0).tolist()
        op, layer, version, n, k, hidden, code = header
        if op == p2p.OP_CLOSE:
            return False
        try:
            dtype = p2p.CODE_DTYPES.get(code)
            if dtype is None:
                raise ValueError(f"hidden: unknown dtype code {code}")
            self.core.check(layer, version, n, k, hidden)
        except PlacementMismatch:
            return self._refuse(pg, p2p.STATUS_PLACEMENT)
        except ValueError:
            return self._refuse(pg, p2p.STATUS_BAD_REQUEST)
        x = p2p.recv(pg, torch.empty(n, hidden, dtype=dtype, device=dev), 0)
        ids = p2p.recv(pg, torch.empty(n, k, dtype=torch.int32, device=dev), 0)
        w = p2p.recv(pg, torch.empty(n, k, dtype=torch.float32, device=dev), 0)
        try:
            out = self.core.forward(layer, version, x, ids, w)
        except ValueError:
            p2p.send(pg, torch.tensor([p2p.STATUS_BAD_REQUEST, 0], device=dev), 0)
            return True  # payload fully read: the stream is still in step
        p2p.send(pg, torch.tensor([p2p.STATUS_OK, n], device=dev), 0)
        p2p.send(pg, out, 0)
        return True

    def _refuse(self, pg, status: int) -> bool:
        p2p.send(pg, torch.tensor([status, 0], device=self.core.device), 0)
        return False  # the payload that follows was not read: close this pair

    def stop(self) -> None:
        self._stop.set()
