"""Faults during 16 concurrent streams: a router replica dies (streams resume elsewhere, no error, no
duplicated or missing token, seeded sampling reproducible); the registry dies (it comes back with its
placement version, replicas re-register, traffic continues)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import ray

from emoe.client import InferenceClient
from tests.e2e.conftest import reference_tokens, server_errors
from tests.waiting import wait_until

APP = "emoe-faults"


@pytest.fixture(scope="module")
def faults_app(launch, demo_model):
    cfg = dict(
        model=str(demo_model),
        groups=2,
        routers=2,
        replicas_per_group=2,
        grpc_port=0,
        kv_blocks=1024,
        admin_token="adm1n",
    )
    app = launch(APP, "/faults", cfg)
    faults_http.append(app.http)
    return app.grpc, app.handle


faults_http: list[str] = []  # the HTTP base URL of the module's app


def test_prefix_aware_routing_sends_a_repeated_prompt_to_the_router_that_cached_it(faults_app):
    """2 routers: a prompt sent again goes to the router that served it before, so every repeat is served
    from its cached blocks (Serve's default, power of two choices, would send some to the other router)."""
    import openai

    c = openai.OpenAI(base_url=faults_http[0] + "/faults/v1", api_key="x", max_retries=0, timeout=60)
    [model] = c.models.list().data
    prompt = " ".join(f"file {i}: all {i % 5} checks passed." for i in range(25))
    usage = [
        c.completions.create(model=model.id, prompt=prompt, max_tokens=2, temperature=0).usage
        for _ in range(5)
    ]
    cached = [u.prompt_tokens_details.cached_tokens for u in usage]
    assert usage[0].prompt_tokens >= 160 and cached[0] == 0, usage[0]
    assert all(n >= 160 for n in cached[1:]), cached  # at least 10 blocks of 16 on every repeat
    # each router's own numbers on /metrics: the hits are all on one of the two
    hits = wait_until(
        lambda: router_series(faults_http[0], "emoe_router_prefix_cache_hits_total"),
        timeout_s=30,
        what="per-router prefix-cache hits of both routers, one with every repeat's",
        until=lambda h: len(h) == 2 and max(h.values()) >= sum(cached),
    )
    assert sorted(hits.values())[0] < 160, hits
    status = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--address", faults_http[0] + "/faults"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert all(rid[:33] in status.stdout for rid in hits), status.stdout


def router_series(http: str, name: str) -> dict[str, float]:
    """{router: value} of a per-router series on the application's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(http + "/faults/metrics", timeout=10).read().decode()
    base = name.removesuffix("_total")
    return {
        s.labels["router"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == base
        for s in f.samples
        if s.name == name
    }


def replica_actor(deployment: str):
    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#{deployment}#" in a["name"]
    ]
    assert names, f"no replica of {deployment}"
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def test_router_dies_mid_stream_and_streams_resume(faults_app, demo_model):
    address, handle = faults_app
    prompts = [f"stream {i}: once upon a time" for i in range(16)]
    sampled = {i: dict(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(0, 16, 2)}
    want = reference_tokens(demo_model, prompts, 80, sampling=sampled)
    got: dict[int, list[int]] = {}
    errors: list[str] = []
    progress = [0] * 16

    def run(i: int) -> None:
        try:
            with InferenceClient(address, timeout_s=180) as c:
                toks = []
                for m in c.generate(prompts[i], max_tokens=80, ignore_eos=True, **sampled.get(i, {})):
                    toks.extend(m.token_ids)
                    progress[i] = len(toks)
                got[i] = toks
        except Exception as e:  # noqa: BLE001 - the test asserts there are none
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    wait_until(
        lambda: (list(progress), list(errors)),  # (tokens per stream, errors)
        60,
        "5 tokens on every stream",
        until=lambda s: min(s[0]) >= 5,
        interval_s=0.05,
    )
    ray.kill(replica_actor("Router"), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    assert errors == [], server_errors(errors)
    assert [got[i] for i in range(16)] == want  # greedy and seeded alike: nothing duplicated or missing
    assert handle.frontend_stats.remote().result()["resumed_streams"] >= 1


def test_registry_dies_and_comes_back_with_its_state(faults_app):
    address, handle = faults_app
    event = handle.admin_replace.remote("adm1n").result()  # placement v1: state worth keeping
    wait_until(
        lambda: handle.placement_state.remote().result()["active_version"],
        60,
        f"placement v{event['to_version']} active",
        until=lambda v: v == event["to_version"],
    )
    ok: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with InferenceClient(address, timeout_s=120) as c:
            while not stop.is_set():
                try:
                    ok.append(len(c.complete("Hello world!", max_tokens=8, ignore_eos=True).token_ids))
                except Exception as e:  # noqa: BLE001 - the test asserts there are none
                    errors.append(repr(e))

    def registry_state() -> tuple[dict, int]:  # (placement state, replicas in the load report)
        state = handle.placement_state.remote().result(timeout_s=5)
        return state, len(handle.load_report.remote().result(timeout_s=5))

    def served() -> tuple[int, list[str]]:  # (completions, errors)
        return len(ok), list(errors)

    t = threading.Thread(target=loop)
    t.start()
    try:
        wait_until(served, 60, "a completion before the registry is killed", until=lambda s: s[0] >= 1)
        ray.kill(replica_actor("Registry"), no_restart=True)
        state, _ = wait_until(
            registry_state,
            90,
            f"the registry back with placement v{event['to_version']} and re-registered replicas",
            until=lambda s: s[0]["active_version"] == event["to_version"] and s[1] > 0,
            ignoring=(Exception,),  # the registry is restarting
            interval_s=0.5,
        )
        served_before = len(ok)
        wait_until(
            served,
            60,
            "3 more completions after the registry came back",
            until=lambda s: s[0] >= served_before + 3,
        )
    finally:
        stop.set()
        t.join(timeout=120)
    assert state["active_version"] == event["to_version"]
    assert errors == [], server_errors(errors)
    assert len(ok) > served_before and all(n == 8 for n in ok)


def test_expert_replicas_killed_every_few_seconds(faults_app, demo_model):
    import os
    import signal

    address, handle = faults_app
    prompts = [f"expert kill {i}: the river runs" for i in range(16)]
    want = reference_tokens(demo_model, prompts, 60)
    got: dict[int, list[int]] = {}
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            with InferenceClient(address, timeout_s=300) as c:
                got[i] = [
                    t for m in c.generate(prompts[i], max_tokens=60, ignore_eos=True) for t in m.token_ids
                ]
        except Exception as e:  # noqa: BLE001 - the test asserts there are none
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    kills = 0
    while any(t.is_alive() for t in threads) and kills < 4:
        time.sleep(2.0)
        group = kills % 2
        # a replica dies while its group has another serving: the replacement of the previous kill is
        # registered first (killing a group's last replica is a group outage, bounded by
        # replacement_wait_s, not what this test is about)
        pids = wait_until(
            lambda g=group: live_pids(handle, g),
            120,
            f"expert group {group} back at 2 replicas",
            until=lambda p: len(p) >= 2,
        )
        if group == 0:
            ray.kill(replica_actor("ExpertGroup-0"), no_restart=True)
        else:  # SIGKILL of a replica's worker process (pids as the replicas registered them)
            os.kill(pids[0], signal.SIGKILL)
        kills += 1
    for t in threads:
        t.join(timeout=300)
    assert kills >= 2
    assert errors == [], server_errors(errors)
    assert [got[i] for i in range(16)] == want


def live_pids(handle, group: int) -> list[int]:
    """Worker pids of the replicas of `group` registered with the registry and still running."""
    replicas = handle.ops_state.remote().result()["snapshot"]["replicas"]
    return [r["pid"] for r in replicas if r["group"] == group and _alive(r["pid"])]


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
