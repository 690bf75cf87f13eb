"""`emoe bench agent` runs both modes over the same multi-turn sessions and reports what caching saved."""

from __future__ import annotations

import json

from bench.agent import main


def test_bench_agent_compares_caching_on_and_off(tmp_path):
    out = tmp_path / "a"
    args = ["--preset", "demo", "--dtype", "float32", "--sessions", "2", "--turns", "3", "--system", "64"]
    assert main([*args, "--per-turn", "16", "--output-len", "4", "--out", str(out)]) == 0
    on, off = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (on["mode"], off["mode"]) == ("cache on", "cache off")
    assert on["requests"] == off["requests"] == 6
    assert on["prompt_tokens_sent"] == off["prompt_tokens_sent"] == off["prompt_tokens_computed"]
    # turn 1: the 64-token system prompt of the second session (4 blocks) at most; turns 2-3: the history
    assert on["prompt_tokens_computed"] < 0.6 * on["prompt_tokens_sent"] and off["hit_rate"] == 0
    assert "TTFT p50 off / on" in out.with_suffix(".md").read_text()
