"""`emoe serve` as a user starts it: reaches `ready`; answers `emoe generate`, lm-eval's own
`LocalCompletionsAPI` (loglikelihood equal to the in-process engine's) and aiperf (chat streaming and
completions, 0 errors, its server-metrics scrape finding the `vllm:` series); structured outputs and their
400s through the Router deployment; exits cleanly on SIGTERM (the module's last test)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.e2e.conftest import free_port
from tests.waiting import wait_until

EMOE = [sys.executable, "-m", "cli.main"]


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command) of every live (non-zombie) process."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, stat, args = line.split(None, 3) + [""] * (4 - len(line.split(None, 3)))
        if not stat.startswith("Z"):
            table[int(pid)] = (int(ppid), stat, args)
    return table


def descendants(root: int) -> set[int]:
    table, found = processes(), {root}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return found - {root}


class Serve(NamedTuple):
    proc: subprocess.Popen
    log: Path
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    env: dict


@pytest.fixture(scope="module")
def serve(demo_model, tmp_path_factory):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    http_port = free_port()
    cwd = tmp_path_factory.mktemp("serve")
    log = cwd / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*EMOE, "serve", "--model", str(demo_model), "--grpc-port", "0", "--http-port", str(http_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    def serve_log() -> str:
        assert proc.poll() is None, log.read_text()  # `emoe serve` keeps running while it deploys
        return log.read_text()

    try:
        wait_until(
            serve_log,
            240,
            "`emoe serve` to print ready",
            until=lambda t: "ready" in t.splitlines(),
            interval_s=0.5,
        )
        text = log.read_text()
        assert "ExpertGroup-0" in text  # progress was shown while deploying
        grpc_addr = re.search(r"gRPC:\s+(\S+)", text).group(1)
        assert f"http://127.0.0.1:{http_port}/v1" in text
        yield Serve(proc, log, f"http://127.0.0.1:{http_port}", grpc_addr, env)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_emoe_generate(serve):
    gen = subprocess.run(
        [*EMOE, "generate", "Once upon a time", "--address", serve.grpc, "--max-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=120,
        env=serve.env,
    )
    assert gen.returncode == 0, gen.stderr
    assert "[finish_reason: length]" in gen.stdout or "[finish_reason: stop]" in gen.stdout


def test_lm_eval_local_completions_against_emoe_serve(serve, demo_model):
    """lm-eval's LocalCompletionsAPI (what `lm_eval --model local-completions` runs): its loglikelihood of
    a continuation equals the in-process engine's log-softmax sum (fp32, 1e-4); generate_until its greedy
    text."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from emoe.tokenizer import Tokenizer
    from router import Engine

    lm = LocalCompletionsAPI(
        base_url=serve.http + "/v1/completions",
        model="demo",
        tokenizer=str(demo_model),
        tokenizer_backend="huggingface",
    )
    pairs = [("Once upon a time", " there was a river"), ("The quick brown fox", " jumps")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    [text] = lm.generate_until(
        [Instance("generate_until", {}, (pairs[0][0], {"max_gen_toks": 5, "until": ["\n\n"]}), 0)]
    )
    tok = Tokenizer(demo_model)
    with Engine.from_pretrained(demo_model, num_groups=2) as engine:
        for (context, continuation), (score, _) in zip(pairs, scores, strict=True):
            ctx, whole = tok.encode(context), tok.encode(context + continuation)
            raw = torch.log_softmax(engine.logits([whole])[0].float(), dim=-1)
            want = sum(float(raw[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
            assert score == pytest.approx(want, abs=1e-4)
        greedy = engine.generate([tok.encode(pairs[0][0])], max_tokens=5)[0]
    assert text == tok.decode(greedy).split("\n\n")[0]


def test_a_repeated_long_prompt_is_served_from_cached_blocks(serve):
    """Automatic prefix caching through `emoe serve`: the second identical long prompt hits cached KV blocks
    (the prefix-cache metrics rise on /metrics, under both names) and its greedy output is the first's."""
    import openai

    def metrics() -> dict[str, float]:
        text = urllib.request.urlopen(serve.http + "/metrics", timeout=30).read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("emoe_prefix_cache", "vllm:prefix_cache"))
        }

    c = openai.OpenAI(base_url=serve.http + "/v1", api_key="x", max_retries=0, timeout=60)
    prompt = " ".join(f"tool result line {i}: the build passed in {i % 7} seconds." for i in range(30))
    before = metrics().get("emoe_prefix_cache_hits_total", 0.0)
    texts = [
        c.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        for _ in range(2)
    ]
    assert texts[0] == texts[1]
    m = wait_until(
        metrics,
        30,
        "the prefix-cache hits of the second request on /metrics",
        until=lambda m: m.get("emoe_prefix_cache_hits_total", 0.0) - before >= 128,
    )
    vllm_hits = [v for k, v in m.items() if k.startswith("vllm:prefix_cache_hits_total")]
    assert vllm_hits == [m["emoe_prefix_cache_hits_total"]], m
    assert m["emoe_prefix_cache_queries_total"] >= 2 * 128 and m["emoe_prefix_cache_blocks"] >= 8


def test_structured_outputs_through_the_router(serve):
    """The grammar compiles in the Router deployment; its output validates, and its errors come back
    through Ray as a 400 naming the field (not a 500)."""
    import json

    import httpx2 as httpx
    import jsonschema
    import openai

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
    }
    c = openai.OpenAI(base_url=serve.http + "/v1", api_key="x", max_retries=0, timeout=60)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    r = c.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=30, response_format=fmt
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    bad = {
        "model": "demo",
        "prompt": "x",
        "max_tokens": 3,
        "structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"},
    }
    for stream in (False, True):
        resp = httpx.post(serve.http + "/v1/completions", json={**bad, "stream": stream}, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "structured_outputs.regex"
    ok = c.completions.create(model="demo", prompt="still", max_tokens=2, extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length"


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def aiperf() -> str:
    """aiperf in its own venv (scripts/aiperf_venv.sh: it pins versions the project's .venv cannot take)."""
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "aiperf_venv.sh")], capture_output=True, text=True, timeout=900
    )
    assert made.returncode == 0, f"scripts/aiperf_venv.sh failed:\n{made.stderr[-3000:]}"
    return made.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("endpoint, streaming", [("chat", True), ("completions", False)])
def test_aiperf_against_emoe_serve(serve, demo_model, aiperf, tmp_path, endpoint, streaming):
    """aiperf profiles `emoe serve` with 0 errors, and its server-metrics scrape of /metrics finds the
    `vllm:` series it keys on."""
    import json

    out = tmp_path / "aiperf"
    cmd = [aiperf, "profile", "--model", "demo", "--url", serve.http, "--endpoint-type", endpoint]
    cmd += ["--streaming"] if streaming else []
    cmd += ["--tokenizer", str(demo_model), "--request-count", "12", "--concurrency", "3"]
    cmd += [
        "--synthetic-input-tokens-mean",
        "24",
        "--output-tokens-mean",
        "8",
        "--extra-inputs",
        "ignore_eos:true",
        "--use-server-token-count",  # the usage the server reports (re-tokenizing random text differs)
    ]
    cmd += ["--artifact-dir", str(out), "--ui-type", "none"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    assert summary["error_summary"] == [], summary["error_summary"]
    assert summary["completed_request_count"]["avg"] == 12
    assert summary["output_sequence_length"]["avg"] == pytest.approx(8, abs=0.01)
    if streaming:
        assert summary["time_to_first_token"]["avg"] > 0 and summary["inter_token_latency"]["avg"] > 0
    scraped = (out / "server_metrics_export.json").read_text()
    for name in ("vllm:num_requests_running", "vllm:generation_tokens", "vllm:time_to_first_token_seconds"):
        assert name in scraped, f"aiperf's server-metrics export lacks {name}"


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}


def test_openai_tools_call_against_emoe_serve(serve):
    """The README's tools example: a named tool_choice returns a schema-valid call, streamed and not."""
    import json

    import jsonschema
    import openai

    c = openai.OpenAI(base_url=serve.http + "/v1", api_key="x", max_retries=0, timeout=60)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    ask = dict(
        model="demo",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
    )
    r = c.chat.completions.create(**ask)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    deltas = [
        d
        for e in c.chat.completions.create(**ask, stream=True)
        if e.choices
        for d in e.choices[0].delta.tool_calls or []
    ]
    assert deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)), WEATHER_SCHEMA)


def test_anthropic_sdk_against_emoe_serve(serve):
    """The anthropic SDK: text with usage, a forced tool_use, stop sequences, streaming, a 400 in
    Anthropic's shape."""
    import anthropic
    import jsonschema

    c = anthropic.Anthropic(base_url=serve.http, api_key="x", max_retries=0, timeout=60)
    hi = [{"role": "user", "content": "Hello"}]
    r = c.messages.create(model="demo", max_tokens=8, messages=hi, extra_body={"ignore_eos": True})
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    tool = {"name": "get_weather", "description": "forecast", "input_schema": WEATHER_SCHEMA}
    r = c.messages.create(
        model="demo",
        max_tokens=200,
        messages=hi,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    r = c.messages.create(
        model="demo",
        max_tokens=20,
        messages=hi,
        stop_sequences=["beta"],
        extra_body={"temperature": 0, "structured_outputs": {"regex": "alpha beta gamma"}},
    )
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "beta"), r
    assert "".join(b.text for b in r.content if b.type == "text") == "alpha "
    with c.messages.stream(
        model="demo", max_tokens=5, messages=hi, extra_body={"ignore_eos": True}
    ) as stream:
        kinds = [e.type for e in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    with pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model="demo", max_tokens=5, messages=[{"role": "robot", "content": "x"}])
    assert err.value.body["type"] == "error" and "messages.0.role" in err.value.body["error"]["message"]


def test_sigterm_stops_emoe_serve_and_its_ray(serve):
    proc, log = serve.proc, serve.log
    started = descendants(proc.pid)
    names = " ".join(processes()[p][2] for p in started if p in processes())
    assert "raylet" in names and "gcs_server" in names, names  # the Ray it started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()
    assert "shutting down" in log.read_text()

    def left_behind() -> dict[int, tuple[int, str, str]]:
        table = processes()
        return {p: table[p] for p in set(table) & started}

    wait_until(left_behind, 30, "the Ray processes to exit", until=lambda left: not left, interval_s=0.5)
    left = left_behind()
    assert not left, f"Ray processes left behind: {left}"
