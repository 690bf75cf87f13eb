"""`emoe bench agent` runs both modes over the same multi-turn sessions and reports what caching saved."""

from __future__ import annotations

import json

from bench.agent import main


def test_bench_agent_compares_caching_on_and_off(tmp_path):
    out = tmp_path / "a"
    args = ["--preset", "demo", "--dtype", "float32", "--sessions", "3", "--turns", "3", "--system", "64"]
    assert (
        main([*args, "--per-turn", "16", "--output-len", "4", "--tool-time", "0.01", "--out", str(out)]) == 0
    )
    on, off, aware, rr, p2 = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (on["mode"], off["mode"]) == ("cache on", "cache off")
    assert [r["mode"] for r in (aware, rr, p2)] == [
        "2 routers, prefix-aware",
        "2 routers, round robin",
        "2 routers, power of two",
    ]
    assert on["requests"] == off["requests"] == aware["requests"] == rr["requests"] == p2["requests"] == 9
    assert on["prompt_tokens_sent"] == off["prompt_tokens_sent"] == off["prompt_tokens_computed"]
    # turn 1: the 64-token system prompt of the second session (4 blocks) at most; turns 2-3: the history
    assert on["prompt_tokens_computed"] < 0.6 * on["prompt_tokens_sent"] and off["hit_rate"] == 0
    # two routers: affinity sends each turn to the router holding the session's history; round robin
    # sends 3 sessions' turns alternately to the router that has only the system prompt
    assert aware["prompt_tokens_sent"] == rr["prompt_tokens_sent"] == on["prompt_tokens_sent"]
    assert aware["hit_rate"] >= max(rr["hit_rate"], p2["hit_rate"]) and aware["computed_share"] < 0.6
    md = out.with_suffix(".md").read_text()
    assert "TTFT p50 off / on" in md and "/ round robin" in md and "/ power of two" in md
