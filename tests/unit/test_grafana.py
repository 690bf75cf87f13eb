"""The Grafana dashboard JSON is valid and every PromQL expression in it passes `promtool`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from cluster.ops import OpsState
from tests.require import require

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "emoe-dashboard.json"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def test_dashboard_json_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["targets"], p["title"]


def test_dashboard_uses_only_metrics_the_application_exports():
    exported = {f.name for f in _families()}
    used = set()
    for e in expressions(json.loads(DASHBOARD.read_text())):
        for word in e.replace("(", " ").replace(")", " ").replace("[", " ").split():
            if word.startswith("emoe_"):
                used.add(
                    word.split("{")[0].removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                )
    assert used <= exported, used - exported


def _families():
    ops = OpsState(None, None, "app", 1)
    ops.snapshot = {"router": {}, "loads": {}, "deployments": {}, "rejected": {}, "replacements": []}
    return ops.families()


def test_every_expression_passes_promtool(tmp_path):
    promtool = require(
        "promtool",
        "it checks every PromQL expression of the Grafana dashboard",
        "Debian package prometheus (`apt-get install prometheus`; .ci/run does this)",
    )
    rules = []
    for i, e in enumerate(expressions(json.loads(DASHBOARD.read_text()))):
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        rules.append({"record": f"emoe:check_{i}", "expr": e})
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "grafana-exprs", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(x[1m]"}]}]})
    )
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True).returncode != 0
