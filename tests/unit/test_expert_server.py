"""The expert data plane in one process (no Ray): wire codec, request checks, gRPC and gloo servers."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from emoe import p2p
from emoe.v1 import expert_pb2 as pb
from emoe.wire import WireError, decode, encode
from experts.dist_server import DistExpertServer
from experts.server import ExpertServicer, GrpcExpertServer
from experts.service import ExpertGroupCore, PlacementMismatch
from experts.store import ExpertStore
from router.dispatch import TransportError
from router.dispatch.dist_transport import DistTransport
from router.dispatch.grpc_transport import grpc_transport

GRPC = grpc_transport(call_timeout_s=10)

H, INTER, E = 16, 8, 4


@pytest.fixture(scope="module")
def core():
    g = torch.Generator().manual_seed(0)
    store = ExpertStore(
        {1: [0, 1, 2, 3]},
        {1: torch.randn(E, 2 * INTER, H, generator=g)},
        {1: torch.randn(E, H, INTER, generator=g)},
    )
    return ExpertGroupCore(store, group=0, placement_version=3, hidden_size=H, device=torch.device("cpu"))


def inputs(n=5, k=2):
    g = torch.Generator().manual_seed(n)
    return (
        torch.randn(n, H, generator=g),
        torch.randint(-1, E, (n, k), generator=g),
        torch.rand(n, k, generator=g),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_wire_round_trip(dtype):
    t = (torch.randn(3, 7) * 100).to(dtype)
    assert torch.equal(decode(encode(t), "x"), t)


@pytest.mark.parametrize(
    "msg, needle",
    [
        (pb.WireTensor(dtype="float64", shape=[1], data=b"\0" * 8), "dtype 'float64' not allowed"),
        (pb.WireTensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "12 data bytes for shape"),
        (pb.WireTensor(dtype="float32", shape=[1 << 40, 1 << 40], data=b""), "exceeds"),
        (pb.WireTensor(dtype="float32", shape=[-1], data=b""), "negative dimension"),
        (pb.WireTensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "rank 9"),
    ],
)
def test_wire_rejects_before_allocating(msg, needle):
    with pytest.raises(WireError, match=needle):
        decode(msg, "hidden")


def test_core_checks(core):
    x, ids, w = inputs()
    with pytest.raises(PlacementMismatch, match="placement_version 2"):
        core.forward(1, 2, x, ids, w)
    with pytest.raises(ValueError, match="layer 0 is not held"):
        core.forward(0, 3, x, ids, w)
    with pytest.raises(ValueError, match="local_ids: ids must be in"):
        core.forward(1, 3, x, ids + 10, w)
    with pytest.raises(ValueError, match="shapes disagree"):
        core.forward(1, 3, x, ids, w[:2])
    with pytest.raises(ValueError, match="hidden: size 8"):
        core.forward(1, 3, x[:, :8], ids, w)


def test_grpc_server_serves_and_refuses_bad_requests(core):
    server = GrpcExpertServer(ExpertServicer(core, "r0", torch.float32))
    endpoint = server.start()

    async def run():
        conn = await GRPC.connect({"grpc_endpoint": endpoint})
        x, ids, w = inputs()
        out = await GRPC.call(conn, 1, 3, x, ids, w)
        torch.testing.assert_close(out, core.store.forward(1, x, ids, w))
        stub = conn.stub
        bad = pb.ExpertForwardRequest(
            layer=1, placement_version=3, hidden=pb.WireTensor(dtype="float32", shape=[5, H], data=b"x")
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Forward(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden" in e.value.details()
        req = pb.ExpertForwardRequest(
            layer=1, placement_version=9, hidden=encode(x), local_ids=encode(ids.int()), weights=encode(w)
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Forward(req)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = await stub.Info(pb.ExpertInfoRequest())
        assert (info.group, list(info.layers), list(info.slots)) == (0, [1], [4])
        out2 = await GRPC.call(conn, 1, 3, x, ids, w)  # still serving
        assert torch.equal(out, out2)
        GRPC.close(conn)

    asyncio.run(run())
    server.stop()


def test_grpc_stream_keeps_order_and_survives_refused_calls(core):
    """The router's long-lived ForwardStream: concurrent calls each get their own answer; a refused call
    fails alone (malformed: ValueError, not retried; other placement: TransportError, retried elsewhere)
    and the stream goes on; a replica that goes away fails the call promptly instead of hanging."""
    server = GrpcExpertServer(ExpertServicer(core, "r0", torch.float32))
    endpoint = server.start()

    async def run():
        conn = await GRPC.connect({"grpc_endpoint": endpoint})
        batches = [inputs(n, 2) for n in (1, 3, 6, 2, 5)]
        outs = await asyncio.gather(*(GRPC.call(conn, 1, 3, x, ids, w) for x, ids, w in batches))
        for (x, ids, w), out in zip(batches, outs, strict=True):
            torch.testing.assert_close(out, core.store.forward(1, x, ids, w))
        x, ids, w = batches[1]
        with pytest.raises(ValueError, match="local_ids"):
            await GRPC.call(conn, 1, 3, x, ids + 10, w)
        with pytest.raises(TransportError, match="FAILED_PRECONDITION"):
            await GRPC.call(conn, 1, 9, x, ids, w)
        with pytest.raises(ValueError, match="layer 0"):
            await GRPC.call(conn, 0, 3, x, ids, w)
        assert conn.broken is None
        torch.testing.assert_close(await GRPC.call(conn, 1, 3, x, ids, w), outs[1])
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            await GRPC.call(conn, 1, 3, x, ids, w)
        assert time.monotonic() - t0 < 5
        await conn.close()

    asyncio.run(run())


def test_grpc_call_to_a_frozen_replica_fails_within_the_call_timeout():
    """A replica that accepts the TCP connection and then never speaks (a frozen or stopped process):
    every call in flight fails with TransportError within the call timeout, the write included (a write
    waits for the HTTP/2 handshake, and used to wait for ever while holding the stream's write lock)."""
    import socket

    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen()
    transport = grpc_transport(call_timeout_s=1.5)

    async def run():
        conn = await transport.connect({"grpc_endpoint": f"127.0.0.1:{frozen.getsockname()[1]}"})
        x, ids, w = inputs(2, 2)
        t0 = time.monotonic()
        got = await asyncio.gather(
            *(transport.call(conn, 1, 3, x, ids, w) for _ in range(3)), return_exceptions=True
        )
        took = time.monotonic() - t0
        assert [type(e) for e in got] == [TransportError] * 3, got
        assert took < 5, f"calls to a frozen replica took {took:.1f}s"
        assert conn.broken
        with pytest.raises(TransportError):  # a broken connection refuses at once; the dispatcher reconnects
            await transport.call(conn, 1, 3, x, ids, w)
        await conn.close()

    try:
        asyncio.run(run())
    finally:
        frozen.close()


def test_gloo_pairs_serve_and_survive_a_bad_header(core):
    server = DistExpertServer(core)
    endpoint = server.start()
    info = {"dist_endpoint": endpoint, "dist_backend": "gloo"}
    tr = DistTransport(timeout_s=10)

    async def run():
        a, b = await tr.connect(info), await tr.connect(info)
        x, ids, w = inputs(7, 3)
        want = core.store.forward(1, x, ids, w)
        for conn in (a, b):
            torch.testing.assert_close(await tr.call(conn, 1, 3, x, ids, w), want)
        # a layer this group does not hold: refused with a status, the pair stays usable
        with pytest.raises(ValueError, match="refused"):
            await tr.call(a, 5, 3, x, ids, w)
        # another placement version (a re-placement in progress): retried elsewhere, as on gRPC (issue 13)
        with pytest.raises(TransportError, match="placement version"):
            await tr.call(a, 1, 4, x, ids, w)
        torch.testing.assert_close(await tr.call(a, 1, 3, x, ids, w), want)
        # a header whose sizes break the limits: that pair is closed, the other keeps working
        p2p.send(a.pg, torch.tensor([p2p.OP_FORWARD, 1, 3, 1 << 40, 1, H, 0]), 1)
        with pytest.raises(TransportError):
            await tr.call(a, 1, 3, x, ids, w)
        torch.testing.assert_close(await tr.call(b, 1, 3, x, ids, w), want)
        tr.close(b)

    asyncio.run(run())
    server.stop()
