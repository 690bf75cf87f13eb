"""gpt-oss through the chat API (issue 16): the conversation rendered by openai-harmony, the output parsed
by harmony's StreamableParser (analysis channel -> reasoning, final channel -> content, commentary to
functions.NAME -> tool calls), a forced call constrained in harmony's call format. On a tiny random
gpt_oss checkpoint with the release's 201088-token vocabulary and a tokenizer.json converted from
harmony's own encoding, with the `openai` client."""

from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import pytest

from cluster.http_api import build_http_app
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.hf_fixtures import make_hf_checkpoint
from tests.hf_fixtures.harmony_tokenizer import VOCAB_SIZE, write_harmony_tokenizer
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import CHAT, MODEL, Server, client
from tests.unit.http_api.test_agent_chat import SEARCH, TOOLS, USER, WEATHER, schema_of


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = make_hf_checkpoint(
        "gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "m", vocab_size=VOCAB_SIZE, max_shard_size="500MB"
    )
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(eos_token_id=200002, pad_token_id=199999)  # as the release's config.json
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [200002, 199999, 200012]}))
    write_harmony_tokenizer(path)
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok, max_context=2048, max_tokens_limit=256)
        with Server(build_http_app(backend, tok, model_name=MODEL)) as url:
            yield url, backend, tok


def test_forced_calls_and_a_tool_result_turn_in_harmony(served):
    url, backend, tok = served
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200, seed=1
        )
        choice = r.choices[0]
        [call] = choice.message.tool_calls
        tool = {t["function"]["name"]: t for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        prompt = backend.requests[-1].prompt_text
        assert "namespace functions {" in prompt and f"type {WEATHER['function']['name']} = " in prompt
        assert prompt.endswith("<|start|>assistant")
        history = [
            *USER,
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "ok"},
        ]
        stream = c.chat.completions.create(
            model=MODEL,
            messages=history,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "search"}},
            max_tokens=200,
            stream=True,
        )
        events = list(stream)
    pieces = [d for e in events if e.choices for d in e.choices[0].delta.tool_calls or []]
    assert pieces[0].function.name == "search" and pieces[0].id and len(pieces) > 2
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in pieces)), schema_of(SEARCH))
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    prompt = backend.requests[-1].prompt_text
    name = call.function.name
    assert (
        f"<|start|>assistant to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>" in prompt
    )
    assert f"<|start|>functions.{name} to=assistant<|channel|>commentary<|message|>ok<|end|>" in prompt


def test_analysis_channel_is_reasoning_and_final_channel_is_content(served):
    url, backend, _ = served
    channels = (
        r"<\|channel\|>analysis<\|message\|>[a-z]{3,8} [a-z]{3,8}<\|end\|>"
        r"<\|start\|>assistant<\|channel\|>final<\|message\|>[A-Z][a-z]{2,8}"
    )
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=60,
            reasoning_effort="high",
            extra_body={"structured_outputs": {"regex": channels}},
        )
        streamed = list(
            c.chat.completions.create(
                model=MODEL,
                messages=USER,
                max_tokens=60,
                stream=True,
                extra_body={"structured_outputs": {"regex": channels}},
            )
        )
    bad = httpx.post(
        url + CHAT, json={"model": MODEL, "messages": USER, "reasoning_effort": "max"}, timeout=30
    )
    msg = r.choices[0].message.model_dump()
    assert len(msg["reasoning_content"].split()) == 2 and msg["reasoning"] == msg["reasoning_content"]
    assert msg["content"][0].isupper() and "<|" not in msg["content"]
    assert "Reasoning: high" in backend.requests[-2].prompt_text
    thought = "".join(
        (e.choices[0].delta.model_dump().get("reasoning_content") or "") for e in streamed if e.choices
    )
    content = "".join(e.choices[0].delta.content or "" for e in streamed if e.choices)
    assert len(thought.split()) == 2 and content[0].isupper() and "<|" not in content + thought
    assert bad.status_code == 400 and "reasoning_effort" in bad.text


def test_anthropic_messages_with_gpt_oss_force_a_tool_use_in_harmony(served):
    """The Messages API over the same harmony path: a forced tool_use, then a tool_result turn rendered by
    harmony, answered in text."""
    import anthropic

    url, backend, _ = served
    tool = {"name": "search", "input_schema": schema_of(SEARCH)}
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)
    r = claude.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=[{"role": "user", "content": "Find the docs."}],
        tools=[tool],
        tool_choice={"type": "tool", "name": "search"},
    )
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    jsonschema.validate(use.input, tool["input_schema"])
    assert backend.requests[-1].prompt_text.endswith("<|start|>assistant")
    again = claude.messages.create(
        model=MODEL,
        max_tokens=8,
        tools=[tool],
        messages=[
            {"role": "user", "content": "Find the docs."},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": "search", "input": use.input}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "none"}]},
        ],
    )
    assert again.usage.output_tokens > 0
    assert "<|start|>functions.search to=assistant<|channel|>commentary<|message|>none<|end|>" in (
        backend.requests[-1].prompt_text
    )
