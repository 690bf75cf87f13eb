"""Ops dashboard in a real browser (Debian chromium via Playwright), /metrics, and `emoe status`,
against the running application under load skewed onto experts 0-3 (expert group 0)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.e2e.conftest import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world!", "Numbers and symbols"]


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"chromium missing at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}); .ci/run installs it")


@pytest.fixture(scope="module")
def ops_app(ray_cluster, tmp_path_factory):
    from ray import serve

    from cluster.app import build_app

    model = write_demo_model(tmp_path_factory.mktemp("ops") / "m", hot_experts=[0, 1, 2, 3])
    tok = Tokenizer(model)
    with Engine.from_pretrained(model) as engine:
        want = {p: engine.generate([tok.encode(p)], max_tokens=24, ignore_eos=True)[0] for p in PROMPTS}
    serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = dict(
        model=str(model),
        groups=2,
        grpc_port=0,
        autoscaling=True,
        min_replicas_per_group=1,
        max_replicas_per_group=3,
        target_tokens_per_s=40.0,
        upscale_delay_s=1.0,
        downscale_delay_s=30.0,
        metrics_push_interval_s=0.5,
        admin_token="adm1n",
    )
    handle = serve.run(build_app(cfg), name="emoe-ops", route_prefix="/")
    grpc = f"127.0.0.1:{handle.addresses.remote().result()['grpc_port']}"
    with LoadDriver(grpc, want, clients=5, max_tokens=24) as load:
        yield {"http": f"http://127.0.0.1:{port}", "handle": handle, "load": load}
    serve.delete("emoe-ops")
    serve.shutdown()


def test_dashboard_shows_live_state_in_a_browser(ops_app, tmp_path):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    shot = Path(os.environ.get("EMOE_ARTIFACTS", tmp_path)) / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(ops_app["http"] + "/dashboard")
        page.wait_for_function(
            "document.getElementById('updated').textContent.startsWith('updated')", timeout=60_000
        )
        shown_before = int(page.text_content("[data-testid=replicas-group-0]"))
        # after the scale-up the shown replica count changes
        page.wait_for_function(
            "Number(document.querySelector('[data-testid=replicas-group-0]').textContent) >= 2",
            timeout=90_000,
        )
        assert shown_before == 1
        assert page.text_content("[data-testid=replicas-group-1]") == "1"  # the cold group stays
        # the heatmap's hottest cell is an expert the workload targets
        page.wait_for_function("document.querySelectorAll('[data-testid=cell]').length > 0", timeout=30_000)
        cells = page.eval_on_selector_all(
            "[data-testid=cell]", "cs => cs.map(c => [Number(c.dataset.load), Number(c.dataset.expert)])"
        )
        assert max(cells)[1] in {0, 1, 2, 3}
        assert page.is_visible("#chart canvas") or page.is_visible("#chart .u-wrap")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    assert errors == [], errors


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_match_the_load(ops_app):
    done_before = ops_app["load"].done
    time.sleep(3)
    m = _scrape(ops_app["http"])
    stats = ops_app["handle"].router_stats.remote().result()
    assert m['emoe_routed_tokens_total{group="0"}'] > 0
    assert m.get('emoe_routed_tokens_total{group="1"}', 0.0) == 0.0  # hot experts 0-3 are all in group 0
    assert 0 < m["emoe_generated_tokens_total"] <= stats["tokens_generated"]
    assert m["emoe_request_latency_seconds_count"] >= done_before
    assert m['emoe_group_replicas{group="1"}'] == 1
    hottest = max((v, k) for k, v in m.items() if k.startswith("emoe_expert_load_tokens_per_second"))
    assert re.search(r'expert="[0-3]"', hottest[1])
    for name in (
        "emoe_ttft_seconds_count",
        "emoe_tpot_seconds_count",
        "emoe_kv_cache_usage_ratio",
        "emoe_queue_depth",
        "emoe_placement_version",
        "emoe_load_imbalance",
        "emoe_failovers_total",
    ):
        assert name in m, name
    assert any(k.startswith("emoe_dispatch_latency_seconds_bucket") for k in m)


def test_admin_actions_need_the_admin_token(ops_app):
    import json

    def post(path: str, token: str | None, body: dict):
        req = urllib.request.Request(
            ops_app["http"] + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"content-type": "application/json", **({"x-emoe-admin-token": token} if token else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post("/dashboard/api/scale", None, {"group": 1, "replicas": 2})[0] == 401
    assert post("/dashboard/api/scale", "wrong", {"group": 1, "replicas": 2})[0] == 401
    assert post("/dashboard/api/scale", "adm1n", {"group": 7, "replicas": 2})[0] == 400
    status, body = post("/dashboard/api/scale", "adm1n", {"group": 1, "replicas": None})
    assert status == 200 and body == {"overrides": {}}


def test_emoe_status_prints_the_same_state(ops_app):
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--address", ops_app["http"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ExpertGroup-0" in out.stdout and "ExpertGroup-1" in out.stdout and "imbalance" in out.stdout
