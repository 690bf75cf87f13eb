"""torch.distributed data-plane server of an expert-group replica (protocol in `emoe.p2p`).

An acceptor thread waits for routers to join; each pair is served by its own thread, one call at a time.
A request for the wrong layer or placement version gets a status reply and the pair stays usable; a header
whose sizes break the limits closes that pair. Either way the replica keeps serving every other pair.
"""

from __future__ import annotations

import logging
import threading

import torch

from emoe import p2p
from experts.service import ExpertGroupCore, PlacementMismatch

log = logging.getLogger(__name__)


class DistExpertServer:
    def __init__(
        self,
        core: ExpertGroupCore,
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        advertise: str | None = None,
    ):
        self.core, self.host, self.timeout_s = core, host, timeout_s
        self.advertise = advertise or host
        self.backend = p2p.backend_for(core.device)
        self._store = p2p.host_store(host, timeout_s)
        self.port = self._store.port
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> str:
        t = threading.Thread(target=self._accept, name="emoe-dist-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return f"{self.advertise}:{self.port}"

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
        if op != p2p.OP_FORWARD:
            return False
        dtype = p2p.CODE_DTYPES.get(code)
        try:
            if dtype is None:
                raise ValueError(f"hidden: unknown dtype code {code}")
            self.core.check_sizes(n, k, hidden)
        except ValueError as e:
            log.warning("dist pair: refusing header %s: %s", header, e)
            return False  # sizes untrusted: the payload cannot be drained, close the pair
        size = p2p.payload_size(n, k, hidden, dtype)
        buf = p2p.recv(pg, torch.empty(size, dtype=torch.uint8, device=dev), 0)
        x, ids, w = p2p.split_payload(buf, n, k, hidden, dtype)
        status = p2p.STATUS_OK
        try:
            out = self.core.forward(layer, version, x, ids, w)
        except PlacementMismatch:
            status, out = p2p.STATUS_PLACEMENT, torch.zeros_like(x)
        except ValueError:
            status, out = p2p.STATUS_BAD_REQUEST, torch.zeros_like(x)
        p2p.send(pg, p2p.as_bytes(torch.tensor([status, n], device=dev), out), 0)
        return True

    def stop(self) -> None:
        self._stop.set()
