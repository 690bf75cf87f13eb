"""Agents over the OpenAI chat API (issue 16), with the `openai` client against the real engine in process
on the demo model (MiniMax-M2 family) under a chat template in MiniMax-M2's format: tools rendered into the
prompt, `tool_choice` named / required enforced by the grammar (a schema-valid call from random weights),
streamed tool-call deltas (name first, arguments in pieces), a tool-result turn, previous reasoning rendered,
reasoning split from content; bad tool input a 400 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx
import jsonschema
import pytest

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import CHAT, MODEL, Server, client

TEMPLATE = (Path(__file__).parent / "minimax_template.jinja").read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 24},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 24},
                "top": {"type": "integer", "minimum": 1, "maximum": 5},
            },
            "required": ["query", "top"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]
# (string bounds: a random-weight model would otherwise write a string until max_tokens; the grammar keeps
# to the schema, so bounded strings end)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("agent") / "m")
    (path / "chat_template.jinja").write_text(TEMPLATE)
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok, max_context=2048, max_tokens_limit=256)
        with Server(build_http_app(backend, tok, model_name=MODEL)) as url:
            yield url, backend


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def test_named_tool_choice_returns_a_schema_valid_call(served):
    url, backend = served
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=250,
            temperature=1.0,
            seed=3,
        )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema_of(WEATHER))
    assert not choice.message.content
    prompt = backend.requests[-1].prompt_text
    assert '"name": "get_weather"' in prompt and '"name": "search"' in prompt  # the tools were rendered
    assert prompt.endswith("]~b]ai\n<think>\n")


def test_required_tool_choice_streams_name_first_then_arguments(served):
    url, _ = served
    with client(url) as c:
        stream = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=250,
            temperature=1.0,
            seed=5,
            stream=True,
        )
        events = [e for e in stream if e.choices]
    deltas = [d for e in events for d in (e.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name in ("get_weather", "search") and deltas[0].id
    assert all(d.index == 0 for d in deltas)
    assert all(d.function.name is None for d in deltas[1:])  # the name once, first
    pieces = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(pieces) > 1  # the arguments arrive as they are generated, not as one blob
    tool = {t["function"]["name"]: t for t in TOOLS}[deltas[0].function.name]
    jsonschema.validate(json.loads("".join(pieces)), schema_of(tool))
    assert events[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_turn_and_previous_reasoning_are_rendered(served):
    url, backend = served
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "The user wants the forecast; call the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 2, "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "user", "content": [{"type": "text", "text": "And search for museums."}]},
    ]
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "search"}},
            max_tokens=250,
            seed=1,
        )
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "search"
    jsonschema.validate(json.loads(call.function.arguments), schema_of(SEARCH))
    prompt = backend.requests[-1].prompt_text
    assert "<think>\nThe user wants the forecast; call the tool.\n</think>" in prompt
    assert (
        '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n<parameter name="days">2</parameter>'
        in prompt
    )
    assert "<response>sunny, 21 C</response>" in prompt and "And search for museums." in prompt


def test_reasoning_is_split_from_content_streamed_and_not(served):
    """The template opens <think>; the output (forced by a regex) closes it: what comes before is reasoning,
    after it content, in `reasoning_content` / `reasoning` and `content`."""
    url, _ = served
    regex = {"structured_outputs": {"regex": r"[a-z]{3,8}( [a-z]{3,8}){2}</think>\n\n[A-Z][a-z]{3,8}\."}}
    with client(url) as c:
        whole = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, seed=2, extra_body=regex)
        stream = c.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=60, seed=2, extra_body=regex, stream=True
        )
        events = [e for e in stream if e.choices]
    msg = whole.choices[0].message.model_dump()
    assert msg["reasoning_content"] == msg["reasoning"] and len(msg["reasoning_content"].split()) == 3
    assert "</think>" not in msg["reasoning_content"] + msg["content"]
    assert msg["content"][0].isupper() and msg["content"].endswith(".")
    streamed = [e.choices[0].delta.model_dump() for e in events]
    assert "".join(d.get("reasoning_content") or "" for d in streamed) == msg["reasoning_content"]
    assert "".join(d.get("content") or "" for d in streamed) == msg["content"]
    assert whole.choices[0].finish_reason == "stop"


def test_tool_choice_none_renders_no_tools_and_parses_nothing(served):
    url, backend = served
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=4, seed=1
        )
    assert r.choices[0].message.tool_calls is None
    assert "get_weather" not in backend.requests[-1].prompt_text


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
        (
            {"messages": [*USER, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
            "messages.1.tool_call_id",
        ),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ],
)
def test_bad_tool_input_is_400_naming_it(served, extra, param):
    url, _ = served
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, **extra}
    r = httpx.post(url + CHAT, json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
