"""The chat API's agent path in the DeepSeek-V3, GLM-4.5 and Kimi-K2 call formats (issue 16): a template in
each family's format (tests/unit/http_api/templates/), the family's call markers added to the tokenizer as
special tokens (as the releases ship them) and the format's parser chosen by the config. With the `openai`
client: `tool_choice` required and named give a schema-valid call from random weights (constrained
decoding in the family's format), streamed with the name first and the arguments in pieces; a tool-result
turn renders the earlier call and its result into the prompt; no marker leaks into `content`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import MODEL, Server, client
from tests.unit.http_api.test_agent_chat import SEARCH, TOOLS, USER, WEATHER, schema_of

TEMPLATES = Path(__file__).parent / "templates"
MARKERS = {  # the call markers each family's tokenizer has as single special tokens
    "deepseek_v3": [
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "<｜end▁of▁sentence｜>",
    ],
    "glm4_moe": ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
    "kimi_k2": [
        "<|tool_calls_section_begin|>",
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>",
        "<|tool_call_argument_begin|>",
        "<|tool_call_end|>",
    ],
}
# how each format writes the first call back into the next turn's prompt, and the tool result
RENDERED = {
    "deepseek_v3": (
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
        "<｜tool▁output▁begin｜>ok<｜tool▁output▁end｜>",
    ),
    "glm4_moe": ("<tool_call>{name}\n<arg_key>", "<|observation|>\n<tool_response>\nok\n</tool_response>"),
    "kimi_k2": (
        "<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>{{",
        "## Return of functions.{name}:0\nok<|im_end|>",
    ),
}


@pytest.fixture(scope="module", params=sorted(MARKERS))
def served(request, tmp_path_factory):
    fmt = request.param
    path = write_demo_model(tmp_path_factory.mktemp(fmt) / "m")
    (path / "chat_template.jinja").write_text((TEMPLATES / f"{fmt}.jinja").read_text())
    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS[fmt]])
    hf.save(str(path / "tokenizer.json"))
    tok = Tokenizer(path)
    assert all(len(tok.encode(m)) == 1 for m in MARKERS[fmt])
    with Engine.from_pretrained(path, num_groups=2) as engine:
        assert tok.vocab_size <= engine.spec.vocab_size
        backend = EngineBackend(engine, tok, max_context=2048, max_tokens_limit=256)
        app = build_http_app(backend, tok, model_name=MODEL, tool_call_parser=fmt)
        with Server(app) as url:
            yield fmt, url, backend


def test_forced_calls_a_tool_result_turn_and_a_streamed_named_call(served):
    fmt, url, backend = served
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=250, seed=3
        )
        choice = r.choices[0]
        [call] = choice.message.tool_calls
        tool = {t["function"]["name"]: t for t in TOOLS}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))
        assert choice.finish_reason == "tool_calls" and not (choice.message.content or "").strip()
        assert WEATHER["function"]["name"] in backend.requests[-1].prompt_text  # tools rendered
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
            max_tokens=250,
            stream=True,
        )
        events = list(stream)
    pieces = [d for e in events if e.choices for d in e.choices[0].delta.tool_calls or []]
    content = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert pieces[0].function.name == "search" and pieces[0].id and len(pieces) > 2
    jsonschema.validate(json.loads("".join(p.function.arguments or "" for p in pieces)), schema_of(SEARCH))
    assert [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason] == [
        "tool_calls"
    ]
    assert not any(m in content for m in MARKERS[fmt]), content
    prompt = backend.requests[-1].prompt_text
    call_form, result_form = RENDERED[fmt]
    assert call_form.format(name=call.function.name) in prompt, prompt[-600:]
    assert result_form.format(name=call.function.name) in prompt, prompt[-600:]
    if fmt == "kimi_k2":  # Kimi's call id is its own head, which its template renders back; N counts calls
        assert call.id == f"functions.{call.function.name}:0" and pieces[0].id == "functions.search:1"
