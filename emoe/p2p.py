"""torch.distributed point-to-point pairs for the expert data plane (gloo on CPU, NCCL on GPU).

There is no global process group: each (router, replica) connection is its own 2-rank group, so a replica
that joins or leaves never stalls traffic to the others. Rendezvous, in steps:
  1. the replica hosts a TCPStore at its data-plane endpoint (OS-assigned port);
  2. a router takes a pair number with `add("pairs", 1)` and sets `join/<i>`;
  3. the replica's acceptor sees `join/<i>` and both sides build a group on `PrefixStore("pair/<i>")`,
     the router as rank 0 and the replica as rank 1.
Per call, three messages:
  1. router -> replica: header int64 [op, layer, placement_version, n, k, H, dtype code];
  2. router -> replica: payload uint8 = hidden [n, H] | local_ids [n, k] int32 | weights [n, k] float32;
  3. replica -> router: reply uint8 = status int64 [2] | output [n, H] (zeros unless status is 0).
A header whose sizes fail the replica's limits closes the pair without a reply (its stream is untrusted).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HEADER = 7
OP_FORWARD, OP_CLOSE = 1, 0
STATUS_OK, STATUS_BAD_REQUEST, STATUS_PLACEMENT = 0, 1, 2
STATUS_BYTES = 16
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


def as_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenates the raw bytes of `tensors` into one uint8 tensor."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def payload_size(n: int, k: int, hidden: int, dtype: torch.dtype) -> int:
    return n * hidden * dtype.itemsize + n * k * 8


def split_payload(buf: torch.Tensor, n: int, k: int, hidden: int, dtype: torch.dtype):
    """uint8 payload -> (hidden [n, H], local_ids [n, k] int32, weights [n, k] float32)."""
    a = n * hidden * dtype.itemsize
    x = buf[:a].view(dtype).view(n, hidden)
    ids = buf[a : a + n * k * 4].view(torch.int32).view(n, k)
    w = buf[a + n * k * 4 :].view(torch.float32).view(n, k)
    return x, ids, w
