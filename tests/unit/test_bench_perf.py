"""`emoe bench` (bench/): the workload and its statistics (workload.py), the roofline's byte count and expert
count (roofline.py), and a whole run (perf.py) against transformers and the in-process engine on the demo
model, with its Markdown, JSON and PNG (report.py)."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest
import torch

from bench.perf import run
from bench.report import render_markdown, write_outputs
from bench.roofline import CountingDispatcher, Roofline
from bench.workload import RequestResult, Workload, percentile, summarize
from emoe.demo import write_demo_model
from emoe.placement import Placement
from emoe.spec import ModelSpec
from router.dispatch import DispatchContext, get_dispatcher


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("bench") / "demo")


def test_workload_is_seeded_and_within_its_ranges():
    w = Workload(requests=50, prompt_len=(3, 9), output_len=(2, 5), seed=7)
    a, b = w.make(100), w.make(100)
    assert a == b
    assert all(3 <= len(p) <= 9 and 2 <= n <= 5 and t == 0.0 for p, n, t in a)
    assert all(0 < tok < 100 for p, _, _ in a for tok in p)
    assert len({len(p) for p, _, _ in a}) > 3  # lengths do vary
    assert Workload(requests=50, seed=8).make(100) != Workload(requests=50, seed=7).make(100)
    open_loop = Workload(requests=200, rate=50.0).make(100)
    arrivals = [t for _, _, t in open_loop]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert 2.5 < arrivals[-1] < 6.0  # 199 gaps of mean 1/50 s


def test_percentiles_and_summary():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([1, 2, 3, 4, 5], 0.99) == pytest.approx(4.96)
    r1 = RequestResult([1, 2, 3], arrival=10.0, token_times=[10.5, 10.6, 10.7])
    r2 = RequestResult([4], arrival=10.0, token_times=[11.0])
    s = summarize([r1, r2], wall_s=2.0)
    assert s["output_tokens"] == 4 and s["tokens_per_s"] == 2.0
    assert s["ttft_p50_s"] == pytest.approx(0.75)
    assert s["tpot_p50_s"] == pytest.approx(0.1)  # r2 has one token: no TPOT


def test_roofline_bytes_match_the_checkpoint(demo):
    """Dense bytes = every router tensor but the embedding, as stored; one expert = its three tensors."""
    from safetensors import safe_open

    spec = ModelSpec.from_pretrained(demo)
    sizes = {}
    for f in demo.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                sizes[name] = n * 4  # float32 checkpoint
    roof = Roofline(spec, torch.float32)
    dense = sum(v for k, v in sizes.items() if ".experts." not in k and k != "model.embed_tokens.weight")
    assert roof.dense_bytes == dense
    one = sum(v for k, v in sizes.items() if ".layers.0.block_sparse_moe.experts.3." in k)
    assert roof.expert_bytes == one
    roof.experts_touched = 5
    kv = 2 * spec.num_kv_heads * spec.head_dim * 4 * spec.num_layers
    assert (
        roof.step_bytes(tokens=2, context_positions=10)
        == dense + 2 * spec.hidden_size * 4 + 5 * one + 10 * kv
    )


def test_counting_dispatcher_counts_distinct_experts_and_passes_the_rest_through(demo):
    spec = ModelSpec.from_pretrained(demo)
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, 2)
    ctx = DispatchContext(demo, spec, torch.float32, torch.device("cpu"), placement)
    inner = get_dispatcher("local")(ctx)
    roof = Roofline(spec, torch.float32)
    counting = CountingDispatcher(inner, roof)
    hidden = torch.randn(3, spec.hidden_size)
    ids = torch.stack([torch.arange(spec.top_k) + row for row in range(3)])  # [3, k]: k + 2 experts
    weights = torch.full(ids.shape, 0.5)
    layer = spec.moe_layer_ids[0]
    counting.begin_step()
    got = asyncio.run(counting.forward(layer, hidden, ids, weights))
    torch.testing.assert_close(got, asyncio.run(inner.forward(layer, hidden, ids, weights)))
    assert roof.experts_touched == spec.top_k + 2
    assert counting.placement is placement and counting.stats() == inner.stats()
    counting.close()
    assert inner.stores == []


def test_run_against_transformers_and_write_the_report(demo, tmp_path):
    work = Workload(requests=6, prompt_len=(3, 20), output_len=(4, 9), concurrency=3, seed=1)
    report = run(demo, work, ["transformers", "inprocess"], dtype="float32", groups=2)
    b = report.backends
    # float32: transformers' own model class and our engine produce the same greedy tokens
    assert b["transformers"]["same_tokens_as_inprocess"] == 1.0
    for name in ("transformers", "inprocess"):
        assert b[name]["requests"] == 6 and b[name]["tokens_per_s"] > 0
        assert b[name]["output_tokens"] == sum(n for _, n, _ in work.make(1024))
        assert 0 < b[name]["ttft_p50_s"] <= b[name]["ttft_p99_s"]
    assert b["inprocess"]["tokens_per_s_vs_inprocess"] == 1.0
    assert b["transformers"]["tokens_per_s_vs_inprocess"] == pytest.approx(
        b["transformers"]["tokens_per_s"] / b["inprocess"]["tokens_per_s"]
    )
    roof = b["inprocess"]["roofline"]
    assert roof["bandwidth_gb_s"] > 0.5 and roof["decode_steps"] > 0
    assert 0 < roof["fraction"] < 1  # a step cannot beat reading its bytes at the measured bandwidth

    paths = write_outputs(report, tmp_path / "perf")
    md = paths["md"].read_text()
    assert "| transformers |" in md and "| inprocess |" in md and "of the roofline" in md
    assert md == render_markdown(report)
    data = json.loads(paths["json"].read_text())
    assert data["backends"]["inprocess"]["requests"] == 6 and data["workload"]["concurrency"] == 3
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 500 and height > 200


def test_open_loop_arrivals_are_honoured(demo):
    work = Workload(requests=5, prompt_len=(4, 4), output_len=(3, 3), rate=20.0, seed=3)
    report = run(demo, work, ["inprocess"], dtype="float32", groups=1, roofline=False)
    s = report.backends["inprocess"]
    assert s["requests"] == 5 and s["output_tokens"] == 15
    offsets = [t for _, _, t in work.make(1024)]
    assert s["wall_s"] >= offsets[-1]  # the last request could not finish before it arrived


def test_rounds_and_a_prefix_caching_off_variant(demo):
    """Two rounds of inprocess and inprocess@nocache (order alternating): medians, the rounds' throughputs
    kept, the same greedy tokens with caching on and off; an unknown variant is refused."""
    work = Workload(requests=4, prompt_len=(4, 8), output_len=(3, 3), concurrency=2, seed=2)
    report = run(
        demo, work, ["inprocess", "inprocess@nocache"], dtype="float32", groups=1, roofline=False, rounds=2
    )
    on, off = report.backends["inprocess"], report.backends["inprocess@nocache"]
    assert len(on["rounds_tokens_per_s"]) == len(off["rounds_tokens_per_s"]) == 2
    assert on["tokens_per_s"] == pytest.approx(sum(on["rounds_tokens_per_s"]) / 2)  # median of two
    assert off["same_tokens_as_inprocess"] == 1.0 and report.meta["rounds"] == 2
    assert "Medians of 2 rounds" in render_markdown(report)
    with pytest.raises(ValueError, match="inprocess@fast"):
        run(demo, work, ["inprocess@fast"], dtype="float32", groups=1, roofline=False)


def test_cli_bench_writes_its_files(demo, tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "cli" / "r"
    rc = main(
        ["bench", "--model", str(demo), "--backends", "inprocess", "--requests", "3", "--concurrency", "2",
         "--prompt-len", "4:8", "--output-len", "3:5", "--dtype", "float32", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| inprocess |" in printed
    assert all(out.with_suffix(s).is_file() for s in (".md", ".json", ".png"))
    assert main(["bench", "--backends", "nope", "--model", str(demo), "--out", str(out)]) == 2
    assert "unknown backend" in capsys.readouterr().err
