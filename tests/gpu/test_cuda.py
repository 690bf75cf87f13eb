"""CUDA tests: run by scripts/gpu_check.sh on a GPU machine; skipped without CUDA. No Ray needed."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from emoe import p2p
from experts import expert_ffn_grouped, expert_ffn_reference
from experts.dist_server import DistExpertServer
from experts.server import ExpertServicer, GrpcExpertServer
from experts.service import ExpertGroupCore
from experts.store import ExpertStore
from router import Engine
from router.dispatch.dist_transport import DistTransport
from router.dispatch.grpc_transport import grpc_transport
from tests.hf_fixtures import make_hf_checkpoint

GRPC = grpc_transport(call_timeout_s=10)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "minimax_m2"])
def test_cuda_engine_matches_cpu(tmp_path, family):
    path = make_hf_checkpoint(family, tmp_path / family)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    with (
        Engine.from_pretrained(path) as cpu,
        Engine.from_pretrained(path, device="cuda", num_groups=2) as gpu,
    ):
        for a, b in zip(cpu.logits(prompts), gpu.logits(prompts), strict=True):
            assert (a - b.cpu()).abs().max().item() <= 1e-4
        assert cpu.generate(prompts, max_tokens=8) == gpu.generate(prompts, max_tokens=8)


def test_grouped_ffn_bf16_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g)
    ids = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(256)])
    w = torch.rand(256, 8, generator=g)
    gu, d = torch.randn(64, 1024, 1024, generator=g) / 32, torch.randn(64, 1024, 512, generator=g) / 22
    got = expert_ffn_grouped(
        x.cuda().bfloat16(), ids.cuda(), w.cuda(), gu.cuda().bfloat16(), d.cuda().bfloat16()
    )
    want = expert_ffn_reference(x[:16], ids[:16], w[:16], gu, d)
    torch.testing.assert_close(got[:16].float().cpu(), want, atol=0.1, rtol=0.05)


def _core(device: str) -> ExpertGroupCore:
    g = torch.Generator().manual_seed(1)
    store = ExpertStore(
        {0: [0, 1, 2, 3]},
        {0: torch.randn(4, 64, 128, generator=g)},
        {0: torch.randn(4, 128, 32, generator=g)},
    )
    return ExpertGroupCore(store.to(torch.device(device)), 0, 0, 128, torch.device(device))


def test_grpc_replica_on_cuda():
    core = _core("cuda")
    server = GrpcExpertServer(ExpertServicer(core, "gpu", torch.float32))
    endpoint = server.start()
    x, ids, w = torch.randn(32, 128), torch.randint(0, 4, (32, 2)), torch.rand(32, 2)

    async def run():
        conn = await GRPC.connect({"grpc_endpoint": endpoint})
        return await GRPC.call(conn, 0, 0, x, ids, w)

    out = asyncio.run(run())
    want = core.store.forward(0, x.cuda(), ids.cuda(), w.cuda()).cpu()
    torch.testing.assert_close(out, want)
    server.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pairs need two GPUs (one per rank)")
def test_nccl_pair_round_trip():
    torch.cuda.set_device(1)
    core = _core("cuda:1")
    server = DistExpertServer(core)
    endpoint = server.start()
    assert server.backend == "nccl"
    torch.cuda.set_device(0)
    tr = DistTransport()
    x = torch.randn(32, 128, device="cuda:0")
    ids, w = torch.randint(0, 4, (32, 2), device="cuda:0"), torch.rand(32, 2, device="cuda:0")

    async def run():
        conn = await tr.connect({"dist_endpoint": endpoint, "dist_backend": "nccl"})
        return await tr.call(conn, 0, 0, x, ids, w)

    out = asyncio.run(run())
    want = core.store.forward(0, x.to("cuda:1"), ids.to("cuda:1"), w.to("cuda:1"))
    torch.testing.assert_close(out.cpu(), want.cpu())
    assert threading.active_count() >= 1 and p2p.backend_for(x.device) == "nccl"
    server.stop()
