"""A burst of 10x capacity: the excess gets RESOURCE_EXHAUSTED quickly, admitted requests complete,
router memory stays bounded; reports the p99 latency of the admitted ones."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from emoe.client import InferenceClient

APP = "emoe-overload"
CAPACITY = 8  # max_num_seqs 4 running + max_queue 4 waiting, one router


@pytest.fixture(scope="module")
def small_app(launch, demo_model):
    cfg = dict(model=str(demo_model), groups=2, grpc_port=0, max_num_seqs=4, max_queue=4, kv_blocks=256)
    app = launch(APP, "/overload", cfg)
    return app.grpc, app.handle


def test_burst_of_ten_times_capacity(small_app):
    address, handle = small_app
    before = handle.router_stats.remote().result()["peak_rss_mb"]
    results: list[tuple[str, float]] = []
    barrier = threading.Barrier(10 * CAPACITY)

    def one() -> None:
        with InferenceClient(address, timeout_s=300) as c:
            barrier.wait()
            t0 = time.monotonic()
            try:
                reply = c.complete("Once upon a time", max_tokens=16, ignore_eos=True)
                results.append(("ok" if len(reply.token_ids) == 16 else "short", time.monotonic() - t0))
            except grpc.RpcError as e:
                results.append((e.code().name, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(10 * CAPACITY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    ok = sorted(d for kind, d in results if kind == "ok")
    refused = sorted(d for kind, d in results if kind == "RESOURCE_EXHAUSTED")
    assert len(results) == 10 * CAPACITY
    assert {kind for kind, _ in results} <= {"ok", "RESOURCE_EXHAUSTED"}, results
    assert len(ok) >= 4 and len(refused) >= 5 * CAPACITY  # at least the queue got in; most were refused
    assert refused[len(refused) // 2] < 2.0  # refused fast: no waiting in line to be told no
    p99 = ok[min(len(ok) - 1, int(0.99 * len(ok)))]
    after = handle.router_stats.remote().result()
    assert after["kv_blocks_used"] == 0 and after["waiting"] == 0
    assert after["peak_rss_mb"] - before < 200, (before, after["peak_rss_mb"])
    print(
        f"burst {10 * CAPACITY}: {len(ok)} admitted (p99 {p99:.2f}s), {len(refused)} refused "
        f"(median {refused[len(refused) // 2] * 1000:.0f} ms), router peak RSS +{after['peak_rss_mb'] - before:.0f} MB"
    )
