"""The OpenAI-compatible HTTP API driven by the official `openai` client and raw HTTP over a fake
backend (no Ray, no model): models, completions, chat, SSE, overload and error statuses."""

from __future__ import annotations

import json

import openai
import pytest

from cluster.http_api import build_http_app
from tests.unit.http_api.support import (
    CHAT,
    COMPLETIONS,
    MODEL,
    USER,
    assert_still_serving,
    client,
    expected_text,
    wait_for,
)


def test_models_list(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_text_prompt(url, tok):
    out = client(url).completions.create(model=MODEL, prompt="hello world", max_tokens=5)
    ids = tok.encode("hello world")
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected_text(tok, ids, 5)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids),
        5,
        len(ids) + 5,
    )


def test_completion_token_id_prompt_and_default_max_tokens(url, tok, backend):
    out = client(url).completions.create(model=MODEL, prompt=[5, 6, 7])
    assert out.choices[0].text == expected_text(tok, [7], 4)  # default_max_tokens=4
    assert backend.requests[-1].prompt_token_ids == (5, 6, 7)
    assert backend.requests[-1].sampling.temperature == 1.0  # OpenAI's default


def test_chat_streamed(url, tok, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    stream = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert text == expected_text(tok, ids, 6)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert backend.requests[-1].prompt_token_ids == tuple(ids)


def test_chat_whole_and_stream_usage(url, tok):
    messages = [{"role": "user", "content": "count"}]
    out = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_text(tok, ids, 3)
    assert out.usage.completion_tokens == 3 and out.usage.prompt_tokens == len(ids)
    stream = client(url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.completion_tokens == 3


def test_completion_stream_is_sse(http, tok):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    parts = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in parts) == expected_text(tok, tok.encode("abc"), 3)
    assert parts[-1]["choices"][0]["finish_reason"] == "length"


def test_overloaded_is_429(http, url):
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "OVERLOAD now"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "OVERLOAD"}])
    assert_still_serving(http)


def test_unexpected_error_is_500_without_details(http):
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "BOOM"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text
    assert_still_serving(http)


def test_error_mid_stream_is_an_error_event(http, backend):
    body = {"model": MODEL, "prompt": "LATEBOOM", "max_tokens": 5, "stream": True}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200
    events = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e]
    assert events[-1] == {
        "error": {
            "message": events[-1]["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "secret" not in r.text and "[DONE]" not in r.text
    assert wait_for(lambda: events[0]["id"] in backend.cancelled)
    assert_still_serving(http)


def test_max_completion_tokens_and_empty_token_refused(http, backend, tok):
    body = {"model": MODEL, "messages": USER, "max_completion_tokens": 2, "max_tokens": 9}
    assert http.post(CHAT, json=body).json()["usage"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="api_token"):
        build_http_app(backend, tok, model_name=MODEL, api_token="")


def test_unknown_path_is_404_in_openai_shape(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
