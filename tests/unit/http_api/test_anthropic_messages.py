"""Anthropic's Messages API (issue 16) with the `anthropic` SDK against the real engine in process on the
demo model under a MiniMax-M2-format template: text, streamed events, forced tool_use with schema-valid
input, a tool_result turn, stop sequences, thinking blocks, usage, count_tokens, x-api-key auth, and 400s
in Anthropic's error shape."""

from __future__ import annotations

import anthropic
import httpx2 as httpx
import jsonschema
import pytest

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import MODEL, TOKEN, Server
from tests.unit.http_api.test_agent_chat import TEMPLATE, WEATHER

TOOL = {
    "name": "get_weather",
    "description": WEATHER["function"]["description"],
    "input_schema": WEATHER["function"]["parameters"],
}
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("anth") / "m")
    (path / "chat_template.jinja").write_text(TEMPLATE)
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok, max_context=2048, max_tokens_limit=256)
        with Server(build_http_app(backend, tok, model_name=MODEL, api_token=TOKEN)) as url:
            yield url, backend, engine, tok


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=TOKEN, max_retries=0, timeout=30)


def test_text_message_with_thinking_and_usage(served):
    """The template opens <think>; a regex makes the output close it: a thinking block, then text."""
    url, backend, _, tok = served
    extra = {"structured_outputs": {"regex": r"[a-z]{3,8} [a-z]{3,8}</think>\n\n[A-Z][a-z]{2,8}"}}
    r = sdk(url).messages.create(
        model=MODEL, max_tokens=40, messages=HI, system="Be brief.", extra_body=extra
    )
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert len(r.content[0].thinking.split()) == 2 and r.content[1].text[0].isupper()
    assert r.stop_reason == "end_turn"
    prompt = backend.requests[-1].prompt_text
    used = r.usage.input_tokens + r.usage.cache_read_input_tokens  # computed + served from the cache
    assert used == len(tok.encode(prompt)) and r.usage.output_tokens > 0
    assert "Be brief." in prompt and "Hello there" in prompt


def test_streamed_events_follow_anthropics_sequence(served):
    url, _, _, _ = served
    with sdk(url).messages.stream(
        model=MODEL, max_tokens=8, messages=HI, extra_body={"ignore_eos": True}
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert (
        events.index("content_block_start")
        < events.index("content_block_stop")
        < events.index("message_delta")
    )


def test_forced_tool_use_then_a_tool_result_turn(served):
    url, backend, _, _ = served
    client = sdk(url)
    r = client.messages.create(
        model=MODEL,
        max_tokens=250,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, TOOL["input_schema"])
    with client.messages.stream(
        model=MODEL,
        max_tokens=250,
        tools=[TOOL],
        tool_choice={"type": "any"},
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain, 7 C"}],
            },
        ],
    ) as stream:
        final = stream.get_final_message()
    [again] = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(again.input, TOOL["input_schema"])
    prompt = backend.requests[-1].prompt_text
    assert "<response>rain, 7 C</response>" in prompt and '<invoke name="get_weather">' in prompt


def test_stop_sequences(served):
    url, _, _, _ = served
    extra = {"structured_outputs": {"regex": r"[a-z]{2,6}</think>\n\nalpha beta gamma"}}
    r = sdk(url).messages.create(
        model=MODEL, max_tokens=40, messages=HI, stop_sequences=["beta"], extra_body=extra
    )
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "beta"
    assert [b.text for b in r.content if b.type == "text"] == ["alpha "]


def test_count_tokens(served):
    url, _, _, tok = served
    n = sdk(url).messages.count_tokens(model=MODEL, messages=HI, system="Be brief.")
    r = sdk(url).messages.create(model=MODEL, max_tokens=1, messages=HI, system="Be brief.")
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens > 0


def test_a_repeated_long_prompt_reports_cache_read_input_tokens(served):
    """Anthropic's usage split: the second time, most of the prompt is read from the prefix cache."""
    url, _, _, _ = served
    long = [{"role": "user", "content": " ".join(f"line {i} of the log says ok." for i in range(40))}]
    a = sdk(url).messages.create(model=MODEL, max_tokens=1, messages=long)
    b = sdk(url).messages.create(model=MODEL, max_tokens=1, messages=long)
    total = a.usage.input_tokens + a.usage.cache_read_input_tokens
    assert total == b.usage.input_tokens + b.usage.cache_read_input_tokens > 200
    assert b.usage.cache_read_input_tokens >= total - 16 - a.usage.cache_read_input_tokens
    assert b.usage.cache_read_input_tokens >= total - 32 and b.usage.cache_creation_input_tokens == 0


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": HI}, "max_tokens"),
        ({"max_tokens": 4, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {
                "max_tokens": 4,
                "messages": HI,
                "tool_choice": {"type": "tool", "name": "nope"},
                "tools": [TOOL],
            },
            "tool_choice",
        ),
        (
            {"max_tokens": 4, "messages": HI, "tools": [{"name": "f", "input_schema": {"type": "objekt"}}]},
            "tools.0.input_schema",
        ),
        (
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "image",
        ),
    ],
)
def test_bad_requests_are_400_in_anthropics_shape(served, body, words):
    url, _, _, _ = served
    r = httpx.post(
        url + "/v1/messages", json={"model": MODEL, **body}, headers={"x-api-key": TOKEN}, timeout=10
    )
    assert r.status_code == 400, r.text
    err = r.json()
    assert (
        err["type"] == "error"
        and err["error"]["type"] == "invalid_request_error"
        and words in err["error"]["message"]
    )
    if "max_tokens" in body:  # (the SDK itself refuses a call without max_tokens)
        with pytest.raises(anthropic.BadRequestError):
            sdk(url).messages.create(**{"model": MODEL, **body})


def test_wrong_key_is_401_in_anthropics_shape(served):
    url, _, _, _ = served
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=HI
        )
    r = httpx.post(url + "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": HI}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
