"""`emoe bench` against the cluster: the gRPC and torch.distributed data planes, and ping-pong micro-batches
over gRPC, each serve the workload with the in-process engine's tokens and are reported as ratios to it."""

from __future__ import annotations

import pytest

from bench.perf import run
from bench.report import render_markdown
from bench.workload import Workload
from emoe.demo import write_demo_model


@pytest.mark.usefixtures("ray_cluster")
def test_cluster_backends_match_the_in_process_engine(tmp_path):
    path = write_demo_model(tmp_path / "demo")
    work = Workload(requests=6, prompt_len=(3, 24), output_len=(4, 10), concurrency=3, seed=2)
    report = run(
        path, work, ["inprocess", "grpc", "dist", "grpc@2"], dtype="float32", groups=2, roofline=False
    )
    expected = sum(n for _, n, _ in work.make(1024))
    for name in ("grpc", "dist", "grpc@2"):
        b = report.backends[name]
        assert b["same_tokens_as_inprocess"] == 1.0, name
        assert b["output_tokens"] == expected and b["requests"] == 6
        assert b["tokens_per_s_vs_inprocess"] > 0 and b["expert_call_ms_mean"] > 0
    assert "| grpc@2 |" in render_markdown(report)
