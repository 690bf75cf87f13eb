"""Structured outputs over the OpenAI API, with the `openai` client against the real engine in process
(issue 15): `response_format` json_schema / json_object, vLLM's `structured_outputs` (regex, choice,
grammar, json) in `extra_body`, streamed and not; a malformed schema, an unsatisfiable regex, a grammar
too slow to compile are a 400 naming the field, and the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx2 as httpx
import jsonschema
import openai
import pytest

from cluster.http_api import build_http_app
from emoe.demo import write_demo_model
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import EngineConfig
from tests.unit.engine_backend import EngineBackend
from tests.unit.http_api.support import CHAT, COMPLETIONS, MODEL, USER, Server, client
from tests.unit.test_structured import SCHEMA, SLOW_SCHEMA


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp("soh") / "m")
    tok = Tokenizer(path)
    with Engine.from_pretrained(path, num_groups=2) as engine:
        backend = EngineBackend(engine, tok, EngineConfig(grammar_timeout_s=0.3))
        with Server(build_http_app(backend, tok, model_name=MODEL)) as base:
            yield base


def test_response_format_json_schema_output_validates(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=60, temperature=1.0, seed=4, n=3, response_format=fmt
        )
        streamed = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=60,
            temperature=1.0,
            seed=4,
            stream=True,
            response_format=fmt,
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    assert text == r.choices[0].message.content  # the same seed, streamed


def test_structured_outputs_regex_choice_grammar_in_extra_body(url):
    regex = r"(19|20)\d\d-(0[1-9]|1[0-2])"
    with client(url) as c:
        rx = c.completions.create(
            model=MODEL, prompt="Date:", max_tokens=20, extra_body={"structured_outputs": {"regex": regex}}
        )
        choice = c.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=20,
            extra_body={"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
        )
        gram = c.completions.create(
            model=MODEL,
            prompt="Answer:",
            max_tokens=20,
            extra_body={"structured_outputs": {"grammar": 'root ::= ("yes" | "no") "!"'}},
        )
        obj = c.completions.create(
            model=MODEL,
            prompt="JSON:",
            max_tokens=60,
            temperature=0,
            extra_body={"structured_outputs": {"json": SCHEMA}},
        )
    assert re.fullmatch(regex, rx.choices[0].text) and rx.choices[0].finish_reason == "stop"
    assert choice.choices[0].message.content in ("positive", "negative", "neutral")
    assert gram.choices[0].text in ("yes!", "no!")
    jsonschema.validate(json.loads(obj.choices[0].text), SCHEMA)


def test_json_object_output_is_a_json_object_prefix(url):
    """Any JSON object: with random weights it may not close within max_tokens, but what is there is the
    start of an object; when it does finish it parses."""
    with client(url) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=30, seed=1, response_format={"type": "json_object"}
        )
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "path, extra, param, words",
    [
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
            "Type should be",
        ),
        (CHAT, {"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SLOW_SCHEMA}}},
            "response_format.json_schema.schema",
            "longer than 0.3 s",
        ),
        (
            COMPLETIONS,
            {"structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}},
            "structured_outputs.regex",
            "no text",
        ),
        (COMPLETIONS, {"structured_outputs": {"regex": "(a|b"}}, "structured_outputs.regex", "parenthesis"),
        (
            COMPLETIONS,
            {"structured_outputs": {"json": "{not json"}},
            "structured_outputs.json",
            "not valid JSON",
        ),
        (COMPLETIONS, {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
        (
            COMPLETIONS,
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
            "exactly one",
        ),
        (
            COMPLETIONS,
            {"structured_outputs": {"grammar": "root ::= ("}},
            "structured_outputs.grammar",
            "EBNF",
        ),
        (
            COMPLETIONS,
            {"structured_outputs": {"structural_tag": "x"}},
            "structured_outputs.structural_tag",
            "not supported",
        ),
    ],
)
def test_bad_grammars_are_400_and_the_server_keeps_serving(url, path, extra, param, words):
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    for stream in (False, True):
        r = httpx.post(url + path, json={**body, "stream": stream}, timeout=10)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and words in error["message"], r.text
    with client(url) as c:
        ok = c.completions.create(
            model=MODEL, prompt="still here", max_tokens=3, extra_body={"ignore_eos": True}
        )
    assert ok.choices[0].finish_reason == "length"


def test_the_openai_client_sees_a_bad_request_error(url):
    with client(url) as c, pytest.raises(openai.BadRequestError, match="structured_outputs.regex"):
        c.completions.create(
            model=MODEL, prompt="x", max_tokens=3, extra_body={"structured_outputs": {"regex": "("}}
        )
