"""Tensor wire codec for the data plane: raw bytes with dtype and shape, limits checked before allocating.

Never pickle: a `WireTensor` is decoded by checking its dtype against a fixed table, its rank and every dim
against limits, and its byte length against dtype x shape, and only then viewing the bytes as a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emoe.v1 import expert_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class WireError(ValueError):
    """A tensor on the wire is malformed or over a limit; the message names the field."""


@dataclass(frozen=True)
class WireLimits:
    max_rank: int = 4
    max_elements: int = 64 * 2**20  # 256 MB of float32
    max_message_bytes: int = 512 * 2**20  # also set as gRPC's max send/receive message length


DEFAULT_LIMITS = WireLimits()
# message size limits of both ends of the gRPC data plane, set explicitly
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", DEFAULT_LIMITS.max_message_bytes),
    ("grpc.max_receive_message_length", DEFAULT_LIMITS.max_message_bytes),
]


def encode(t: torch.Tensor) -> pb.WireTensor:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot go on the wire; choices: {', '.join(WIRE_DTYPES)}")
    t = t.detach().contiguous().cpu()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.WireTensor(dtype=name, shape=list(t.shape), data=data)


def decode(
    msg: pb.WireTensor,
    field: str,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    dtypes: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """Checks `msg` (named `field` in errors), then returns a tensor over a copy of its bytes."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None or (dtypes is not None and msg.dtype not in dtypes):
        allowed = dtypes or tuple(WIRE_DTYPES)
        raise WireError(f"{field}: dtype {msg.dtype!r} not allowed; expected one of {', '.join(allowed)}")
    shape = tuple(msg.shape)
    if len(shape) > limits.max_rank:
        raise WireError(f"{field}: rank {len(shape)} exceeds {limits.max_rank}")
    numel = 1
    for d in shape:
        if d < 0:
            raise WireError(f"{field}: negative dimension in shape {list(shape)}")
        numel *= d
        if numel > limits.max_elements:
            raise WireError(f"{field}: shape {list(shape)} exceeds {limits.max_elements} elements")
    if len(msg.data) != numel * dtype.itemsize:
        raise WireError(
            f"{field}: {len(msg.data)} data bytes for shape {list(shape)} of {msg.dtype} "
            f"(expected {numel * dtype.itemsize})"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)
