"""A MiniMax-M2-layout checkpoint (FP8, no eos in config.json, eos in generation_config.json) served by the
application stops at that eos, over gRPC and over the OpenAI HTTP API (issue 14)."""

from __future__ import annotations

import shutil

import httpx2 as httpx

from emoe.client import InferenceClient
from router import Engine
from tests.hf_fixtures.releases import make_release

PROMPT = [42, 7, 9]


def test_minimax_m2_release_stops_at_the_generation_config_eos(launch, demo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    probe, _ = make_release("MiniMaxAI/MiniMax-M2", root / "probe", seed=4)
    with Engine.from_pretrained(probe) as engine:
        free = engine.generate([PROMPT], max_tokens=12, ignore_eos=True)[0]
    eos = free[3]
    want = free[: free.index(eos) + 1]  # up to and including the first eos
    path, _ = make_release("MiniMaxAI/MiniMax-M2", root / "served", seed=4, eos_token_id=eos)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: prompts go as token ids
        if (demo_model / f).is_file():
            shutil.copyfile(demo_model / f, path / f)
    cfg = dict(model=str(path), groups=2, transport="grpc", grpc_port=0, kv_blocks=256)
    served = launch("release-eos", "/release", cfg)

    with InferenceClient(served.grpc) as client:
        assert eos in client.model_info().eos_token_ids
        reply = client.complete(prompt_token_ids=PROMPT, max_tokens=12, temperature=0.0)
    assert list(reply.token_ids) == want and reply.finish_reason == "stop"

    body = {"model": path.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{served.http}/release/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == len(want)
