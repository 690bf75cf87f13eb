"""The OpenAI HTTP API refuses bad input naming the field, checks the bearer token, and cancels the
backend when the client goes away."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from tests.unit.http_api.support import (
    CHAT,
    COMPLETIONS,
    MAX_CONTEXT,
    MAX_TOKENS_LIMIT,
    MODEL,
    TOKEN,
    USER,
    assert_still_serving,
    client,
    wait_for,
)

BAD = [
    ("empty prompt", COMPLETIONS, {"prompt": ""}, "prompt"),
    ("ids outside vocab", COMPLETIONS, {"prompt": [1, 10**6]}, "prompt"),
    ("negative id", COMPLETIONS, {"prompt": [-1]}, "prompt"),
    ("prompt too long", COMPLETIONS, {"prompt": [5] * MAX_CONTEXT}, "prompt"),
    ("bad prompt in a batch", COMPLETIONS, {"prompt": ["a", [1, 2.5]]}, "prompt[1]"),
    ("batch too large", COMPLETIONS, {"prompt": ["a"] * 65}, "prompt"),
    (
        "max_tokens above limit",
        COMPLETIONS,
        {"prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1},
        "max_tokens",
    ),
    ("prompt + max_tokens", COMPLETIONS, {"prompt": [5] * 40, "max_tokens": 30}, "max_tokens"),
    ("max_tokens string", COMPLETIONS, {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("temperature -1", COMPLETIONS, {"prompt": "hi", "temperature": -1}, "temperature"),
    ("top_p 2", COMPLETIONS, {"prompt": "hi", "top_p": 2}, "top_p"),
    ("top_k -2", COMPLETIONS, {"prompt": "hi", "top_k": -2}, "top_k"),
    ("n 17", COMPLETIONS, {"prompt": "hi", "n": 17}, "n"),
    ("logprobs 21", COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("suffix", COMPLETIONS, {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("empty stop", COMPLETIONS, {"prompt": "hi", "stop": [""]}, "stop"),
    ("stop not strings", COMPLETIONS, {"prompt": "hi", "stop": [1]}, "stop"),
    ("wrong model", COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("missing messages", CHAT, {}, "messages"),
    ("empty messages", CHAT, {"messages": []}, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("chat n 0", CHAT, {"messages": USER, "n": 0}, "n"),
    ("chat wrong model", CHAT, {"messages": USER, "model": "other"}, "model"),
    ("chat temperature -1", CHAT, {"messages": USER, "temperature": -1}, "temperature"),
    ("chat top_logprobs alone", CHAT, {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_400_naming_the_field(http, path, body, param):
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] == param, error
    assert_still_serving(http)


RAW = [
    ("malformed JSON", COMPLETIONS, '{"prompt": "hi", ', None, "JSON"),
    ("NaN", COMPLETIONS, '{"prompt": "hi", "temperature": NaN}', "temperature", "finite"),
    (
        "Infinity",
        CHAT,
        '{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
        "top_p",
        "finite",
    ),
    ("not an object", COMPLETIONS, "[1, 2]", None, "JSON object"),
]


@pytest.mark.parametrize("path, raw, param, words", [b[1:] for b in RAW], ids=[b[0] for b in RAW])
def test_bad_json_is_400(http, path, raw, param, words):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert_still_serving(http)


def test_bearer_token(auth_url):
    with httpx.Client(base_url=auth_url, timeout=10) as h:
        assert h.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = h.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert h.post(COMPLETIONS, json=body).status_code == 401
        assert h.post(COMPLETIONS, json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert h.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(auth_url, "wrong").models.list()
    assert [m.id for m in client(auth_url, TOKEN).models.list().data] == [MODEL]


def test_client_disconnect_mid_stream_cancels(http, backend):
    body = {"model": MODEL, "prompt": "SLOW stream", "max_tokens": 30, "stream": True}
    with http.stream("POST", COMPLETIONS, json=body) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    request_id = json.loads(first.removeprefix("data: "))["id"]
    assert wait_for(lambda: request_id in backend.cancelled), "cancel was not called"
    assert request_id not in backend.completed
    assert_still_serving(http)


def test_client_disconnect_while_waiting_cancels(url, backend):
    body = {"model": MODEL, "prompt": "SLOW whole", "max_tokens": 30}
    with httpx.Client(base_url=url, timeout=0.3) as h, pytest.raises(httpx.ReadTimeout):
        h.post(COMPLETIONS, json=body)
    request_id = next(r.request_id for r in backend.requests if r.prompt_text == "SLOW whole")
    assert wait_for(lambda: request_id in backend.cancelled), "cancel was not called"
    assert request_id not in backend.completed


def test_finished_requests_are_not_cancelled(url, backend):
    out = client(url).completions.create(model=MODEL, prompt="done", max_tokens=2)
    assert out.id in backend.completed and out.id not in backend.cancelled
