"""Ops dashboard in a real browser (Debian chromium via Playwright), /metrics, and `emoe status`,
against the running application under load skewed onto experts 0-3 (expert group 0)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.autoscale import LoadDriver
from emoe.demo import write_demo_model
from tests.require import require
from tests.waiting import wait_until

PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world!", "Numbers and symbols"]


@pytest.fixture(scope="module")
def ops_app(launch, tmp_path_factory):
    model = write_demo_model(tmp_path_factory.mktemp("ops") / "m", hot_experts=[0, 1, 2, 3])
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
    app = launch("emoe-ops", "/", cfg, prompts=PROMPTS, max_tokens=24)
    with LoadDriver(app.grpc, app.want, clients=5, max_tokens=24) as load:
        yield {"http": app.http, "handle": app.handle, "load": load}


def test_dashboard_shows_live_state_in_a_browser(ops_app, tmp_path):
    chromium = require(
        "chromium",
        "the dashboard is checked in a real browser (Playwright drives Debian's chromium)",
        "Debian package chromium (`apt-get install chromium`; .ci/run does this)",
    )
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    shot = Path(os.environ.get("EMOE_ARTIFACTS", tmp_path)) / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
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

    def caught_up(m: dict[str, float]) -> bool:  # the pushed metrics cover the requests done before
        return (
            m.get("emoe_request_latency_seconds_count", 0.0) >= done_before
            and m.get('emoe_routed_tokens_total{group="0"}', 0.0) > 0
        )

    m = wait_until(lambda: _scrape(ops_app["http"]), 60, "/metrics to cover the load", until=caught_up)
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
        "emoe_prefix_cache_hits_total",
        "emoe_prefix_cache_hit_ratio",
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
