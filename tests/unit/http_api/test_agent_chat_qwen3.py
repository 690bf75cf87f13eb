"""The chat API's agent path in the Hermes / Qwen3 call format (issue 16): a Qwen3-format template, the
`hermes` tool-call parser chosen by the config; a forced call is schema-valid, a tool-result turn renders,
`chat_template_kwargs.enable_thinking` reaches the template and the reasoning split follows it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import MODEL, Server, client
from tests.unit.http_api.test_agent_chat import SEARCH, TOOLS, USER, WEATHER, schema_of

TEMPLATE = (Path(__file__).parent / "qwen3_template.jinja").read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("qwen") / "m")
    (path / "chat_template.jinja").write_text(TEMPLATE)
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok, max_context=2048, max_tokens_limit=256)
        app = build_http_app(
            backend, tok, model_name=MODEL, tool_call_parser="hermes", reasoning_parser="think"
        )
        with Server(app) as url:
            yield url, backend


def test_forced_call_in_the_hermes_format_and_a_tool_result_turn(served):
    url, backend = served
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=250, seed=7
        )
        [call] = r.choices[0].message.tool_calls
        tool = {t["function"]["name"]: t for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))
        assert r.choices[0].finish_reason == "tool_calls"
        assert (
            '<tools>\n{"type": "function", "function": {"name": "get_weather"'
            in backend.requests[-1].prompt_text
        )
        history = [
            *USER,
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "ok"},
        ]
        again = c.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "search"}},
            max_tokens=250,
            stream=True,
        )
        pieces = [d for e in again if e.choices for d in e.choices[0].delta.tool_calls or []]
    assert pieces[0].function.name == "search" and len(pieces) > 2
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in pieces)), schema_of(SEARCH))
    prompt = backend.requests[-1].prompt_text
    assert f'<tool_call>\n{{"name": "{call.function.name}", "arguments": ' in prompt
    assert "<tool_response>\nok\n</tool_response>" in prompt
    assert WEATHER["function"]["name"] in prompt


def test_enable_thinking_false_closes_the_think_block(served):
    url, backend = served
    regex = {"structured_outputs": {"regex": "[a-z]{3,6} done"}}
    with client(url) as c:
        off = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=30,
            extra_body={**regex, "chat_template_kwargs": {"enable_thinking": False}},
        )
        assert backend.requests[-1].prompt_text.endswith("<think>\n\n</think>\n\n")
        on = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=30,
            extra_body={"structured_outputs": {"regex": "<think>[a-z]{3,6}</think>\n\n[a-z]{3,6} done"}},
        )
    assert off.choices[0].message.content.endswith(" done")
    assert not (off.choices[0].message.model_dump().get("reasoning_content"))
    msg = on.choices[0].message.model_dump()
    assert msg["content"].endswith(" done") and 3 <= len(msg["reasoning_content"]) <= 6
