"""`emoe bench sampling` runs every variant to the full output length (the structured ones too: their
grammars cannot end early) and writes its table."""

from __future__ import annotations

import json

from bench.sampling import VARIANTS, main


def test_bench_sampling_runs_every_variant_the_whole_length(tmp_path):
    out = tmp_path / "s"
    args = ["--preset", "demo", "--dtype", "float32", "--streams", "3", "--output-len", "5", "--rounds", "1"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(VARIANTS)
    # every stream decodes 5 tokens: the first from its prefill, then 4 steps with all 3 streams in them
    assert all(r["steps"] == 4 and r["step_ms"] > 0 for r in rows), rows
    table = out.with_suffix(".md").read_text()
    assert all(f"| {v} |" in table for v in VARIANTS)
