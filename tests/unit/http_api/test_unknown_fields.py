"""Unknown request fields (what OpenAI clients and benchmark tools add) are ignored and counted, as vLLM
does; known fields this server does not support stay a 400 naming them (issue 15, point 6)."""

from __future__ import annotations

import httpx2 as httpx

from cluster.http_api import build_http_app
from cluster.ops import MAX_FIELD_LABELS, OpsState
from tests.unit.http_api.support import COMPLETIONS, MODEL, FakeBackend, Server


def test_unknown_fields_are_ignored_and_reported_known_unsupported_are_400(tok):
    seen: list[list[str]] = []
    app = build_http_app(FakeBackend(tok), tok, model_name=MODEL, on_ignored=seen.append)
    with Server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "aiperf_tag": "x", "priority": 3}
        r = http.post(COMPLETIONS, json=body)
        assert r.status_code == 200, r.text
        r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi", "best_of": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    assert seen == [["aiperf_tag", "priority"]]


def test_ignored_field_counts_are_bounded():
    ops = OpsState(None, None, "app", 1)
    ops.count_ignored(["a", "a", "b"])
    ops.count_ignored([f"f{i}" for i in range(3 * MAX_FIELD_LABELS)])
    assert ops.ignored["a"] == 2 and ops.ignored["b"] == 1
    assert len(ops.ignored) == MAX_FIELD_LABELS + 1 and ops.ignored["other"] > 0
