"""torch.distributed point-to-point pairs for the expert data plane (gloo on CPU, NCCL on GPU).

There is no global process group: each (router, replica) connection is its own 2-rank group, so a replica
that joins or leaves never stalls traffic to the others. Rendezvous, in steps:
  1. the replica hosts a TCPStore at its data-plane endpoint (OS-assigned port);
  2. a router takes a pair number with `add("pairs", 1)` and sets `join/<i>`;
  3. the replica's acceptor sees `join/<i>` and both sides build a group on `PrefixStore("pair/<i>")`,
     the router as rank 0 and the replica as rank 1.
Per call: router sends a header (int64) then hidden [n, H], local_ids [n, k] (int32), weights [n, k]
(float32); the replica answers a status header, then (status 0 only) the output [n, H].
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HEADER = 7  # [op, layer, placement_version, n, k, H, dtype code]
OP_FORWARD, OP_CLOSE = 1, 0
STATUS_OK, STATUS_BAD_REQUEST, STATUS_PLACEMENT = 0, 1, 2
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def host_store(host: str, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout(timeout_s))


def client_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timeout(timeout_s))


def pair_group(store: dist.Store, pair: int, rank: int, backend: str, timeout_s: float):
    """The 2-rank process group of one router-replica pair."""
    prefixed = dist.PrefixStore(f"pair/{pair}", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2, dist.ProcessGroupNCCL.Options())
    if backend != "gloo":
        raise ValueError(f"unknown torch.distributed backend {backend!r}; choices: gloo, nccl")
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout(timeout_s))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def send(pg, t: torch.Tensor, dst: int) -> None:
    pg.send([t.contiguous()], dst, 0).wait()


def recv(pg, t: torch.Tensor, src: int) -> torch.Tensor:
    pg.recv([t], src, 0).wait()
    return t
