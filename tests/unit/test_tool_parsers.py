"""Tool-call parsers (emoe/tool_parsers.py): whole outputs, every streaming split, malformed output."""

from __future__ import annotations

import json
import random
import re

import pytest

from emoe.tool_parsers import (
    PARSERS,
    ParseDelta,
    ToolParser,
    parse_whole,
    parser_for_family,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "temp": {"type": "number"},
                    "metric": {"type": "boolean"},
                    "opts": {"type": "object"},
                    "tags": {"type": "array"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]

DS_CALLS_B, DS_CALLS_E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_B, DS_E, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def _ds3(name, args):
    return f"{DS_B}function{DS_SEP}{name}\n```json\n{args}\n```{DS_E}"


def _ds31(name, args):
    return f"{DS_B}{name}{DS_SEP}{args}{DS_E}"


# (format, output, expected content, expected [(name, arguments object)])
CASES = [
    # MiniMax-M2
    (
        "minimax_m2",
        'Let me check.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
        '<parameter name="days">3</parameter>\n<parameter name="metric">true</parameter>\n</invoke>\n'
        "</minimax:tool_call>",
        "Let me check.\n",
        [("get_weather", {"city": "Paris", "days": 3, "metric": True})],
    ),
    (
        "minimax_m2",
        '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">\nNew York\n</parameter>\n'
        '<parameter name="opts">{"unit": "C", "n": [1, 2]}</parameter>\n<parameter name="temp">21.5</parameter>\n'
        '</invoke>\n<invoke name="get_time">\n</invoke>\n<invoke name="unknown_fn">\n'
        '<parameter name="x">5</parameter>\n</invoke>\n</minimax:tool_call>',
        "",
        [
            ("get_weather", {"city": "New York", "opts": {"unit": "C", "n": [1, 2]}, "temp": 21.5}),
            ("get_time", {}),
            ("unknown_fn", {"x": "5"}),
        ],
    ),
    ("minimax_m2", "No tools needed: 3 < 4 and <b>bold</b>.", "No tools needed: 3 < 4 and <b>bold</b>.", []),
    (
        "minimax_m2",
        '<minimax:tool_call><invoke name="get_weather"><parameter name="days">three</parameter>'
        '<parameter name="note">null</parameter></invoke></minimax:tool_call>\n\nDone.',
        "Done.",
        [("get_weather", {"days": "three", "note": None})],
    ),
    # Hermes / Qwen
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris \\u00e9", "days": 3, '
        '"opts": {"a": [1, {"b": null}]}, "metric": false}}\n</tool_call>',
        "Sure.\n",
        [("get_weather", {"city": 'Pa"ris é', "days": 3, "opts": {"a": [1, {"b": None}]}, "metric": False})],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {"k": "v"}, "name": "reordered"}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {}), ("reordered", {"k": "v"})],
    ),
    ("hermes", "Just text, with a <tool> tag and a < b.", "Just text, with a <tool> tag and a < b.", []),
    (
        "hermes",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call> ok',
        "ok",
        [("get_weather", {"city": "Rome"})],
    ),
    # DeepSeek V3 / R1 / V3.1
    (
        "deepseek_v3",
        "Checking."
        + DS_CALLS_B
        + _ds3("get_weather", '{"city": "Paris", "days": 3}')
        + "\n"
        + _ds3("get_time", "{}")
        + DS_CALLS_E,
        "Checking.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})],
    ),
    (
        "deepseek_v3",
        DS_CALLS_B
        + _ds31("get_weather", '{"city": "Paris", "tags": ["a", "b"]}')
        + _ds31("get_time", "{}")
        + DS_CALLS_E,
        "",
        [("get_weather", {"city": "Paris", "tags": ["a", "b"]}), ("get_time", {})],
    ),
    ("deepseek_v3", "No call here | ｜ <｜tool", "No call here | ｜ <｜tool", []),
    (
        "deepseek_v3",
        _ds31("get_weather", '{"city": "Oslo"}') + " then text",
        "then text",
        [("get_weather", {"city": "Oslo"})],
    ),
    # GLM-4.5 / 4.6 / 4.7
    (
        "glm4_moe",
        "Looking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        "Looking.\n",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        "glm4_moe",
        "<tool_call>get_weather<arg_key>metric</arg_key><arg_value>True</arg_value>"
        "<arg_key>tags</arg_key><arg_value>[1, 2]</arg_value></tool_call>\n"
        "<tool_call>get_time\n</tool_call>",
        "",
        [("get_weather", {"metric": True, "tags": [1, 2]}), ("get_time", {})],
    ),
    ("glm4_moe", "plain <tool_call text", "plain <tool_call text", []),
]

KM_S, KM_SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KM_B, KM_A, KM_E = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def _km(head, args):
    return f"{KM_B}{head}{KM_A}{args}{KM_E}"


CASES += [
    # Kimi-K2
    (
        "kimi_k2",
        "Let me check."
        + KM_S
        + _km("functions.get_weather:0", '{"city": "Paris", "days": 3}')
        + _km("functions.get_time:1", "{}")
        + KM_SE,
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})],
    ),
    (
        "kimi_k2",
        "<|tool_call_section_begin|> "
        + _km(" get_weather ", '{"tags": ["a", "b"]}')
        + " <|tool_call_section_end|>ok",
        "ok",
        [("get_weather", {"tags": ["a", "b"]})],
    ),
    ("kimi_k2", "No call | <|tool <| here", "No call | <|tool <| here", []),
    (
        "kimi_k2",
        _km("functions.get_weather:7", '{"city": "Oslo"}') + " then text",
        "then text",
        [("get_weather", {"city": "Oslo"})],
    ),
]

IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
KIMI_ID = re.compile(r"functions\.[^:]+:\d+")


def _stream(parser: ToolParser, pieces):
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    return deltas


def _collect(deltas: list[ParseDelta]):
    """(content, {index: {"id", "name", "args", "frags"}}) checking the delta protocol on the way."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:
                # the call's first delta carries id and name, before any arguments
                assert tc.id is not None
                assert (tc.id.startswith("call_") and len(tc.id) == 29) or KIMI_ID.fullmatch(tc.id), tc.id
                assert tc.name
                calls[tc.index] = {"id": tc.id, "name": tc.name, "args": "", "frags": 0}
            else:
                assert tc.id is None and tc.name is None
            if tc.arguments:
                calls[tc.index]["args"] += tc.arguments
                calls[tc.index]["frags"] += 1
    assert sorted(calls) == list(range(len(calls)))
    return content, calls


@pytest.mark.parametrize("fmt,text,content,expected", CASES, ids=IDS)
def test_whole_output(fmt, text, content, expected):
    got_content, calls = parse_whole(PARSERS[fmt], text, TOOLS)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    for c in calls:
        assert c["type"] == "function"
        assert c["id"].startswith("call_") or (fmt == "kimi_k2" and KIMI_ID.fullmatch(c["id"]))
    p = PARSERS[fmt](TOOLS)
    _stream(p, [text])
    assert p.called == bool(expected)


def _expected(fmt, text):
    content, calls = _collect(_stream(PARSERS[fmt](TOOLS), [text]))
    return content, [(c["name"], c["args"]) for _, c in sorted(calls.items())]


def _check_pieces(fmt, text, pieces, want):
    content, calls = _collect(_stream(PARSERS[fmt](TOOLS), pieces))
    got = [(c["name"], c["args"]) for _, c in sorted(calls.items())]
    assert (content, got) == want, pieces
    return calls


@pytest.mark.parametrize("fmt,text,content,expected", CASES, ids=IDS)
def test_every_two_piece_split(fmt, text, content, expected):
    want = _expected(fmt, text)
    assert want[0] == content
    for i in range(1, len(text)):
        _check_pieces(fmt, text, [text[:i], text[i:]], want)


@pytest.mark.parametrize("fmt,text,content,expected", CASES, ids=IDS)
def test_char_by_char_and_random_chunks(fmt, text, content, expected):
    want = _expected(fmt, text)
    calls = _check_pieces(fmt, text, list(text), want)
    if fmt in ("hermes", "deepseek_v3", "kimi_k2"):  # JSON arguments stream as they arrive
        for c in calls.values():
            # (other key orders and string-encoded arguments are parsed as one object, at its end)
            if json.loads(c["args"]) and c["name"] != "reordered" and '"arguments": "' not in text:
                assert c["frags"] > 2
    else:  # XML formats: "{", then each parameter, then "}"
        for c in calls.values():
            assert c["frags"] == len(json.loads(c["args"])) + 2
    rng = random.Random(1234)
    for _ in range(30):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 12)
            pieces.append(text[i : i + n])
            i += n
        _check_pieces(fmt, text, pieces, want)


def test_held_back_marker_prefix():
    p = PARSERS["minimax_m2"](TOOLS)
    assert p.feed("Hello <minimax:to").content == "Hello "
    assert p.feed("ast> done").content == "<minimax:toast> done"
    p = PARSERS["hermes"](TOOLS)
    assert p.feed("a < b").content == "a < b"  # certainly not a marker: emitted at once
    assert p.feed(" <tool").content == " "
    assert p.feed(">").content == "<tool>"
    assert p.finish().content == ""
    assert not p.called


def test_name_before_arguments_streaming():
    p = PARSERS["hermes"](TOOLS)
    d = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert d.content == "" and len(d.tool_calls) == 1
    assert d.tool_calls[0].name == "get_weather" and d.tool_calls[0].arguments == '{"city": "Par'
    d = p.feed('is"}}\n</tool_call>')
    assert d.tool_calls[0].arguments == 'is"}' and d.tool_calls[0].name is None
    assert p.called and p.finish() == ParseDelta()


MALFORMED = [
    # (format, text, content must contain, expected call names)
    (
        "hermes",
        'Hi <tool_call>\n{"name": "get_weather", "argu',
        '<tool_call>\n{"name": "get_weather", "argu',
        [],
    ),
    ("hermes", "<tool_call> not json at all", "<tool_call> not json at all", []),
    ("hermes", '<tool_call>\n{"name": oops}\n</tool_call>', '{"name": oops}', []),
    (
        "hermes",
        '<tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        "<tool_call>",
        ["get_time"],
    ),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1,,}}</tool_call> after', "after", ["f"]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', "tru", ["f"]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "unterminated', "", ["f"]),
    (
        "hermes",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        "<parameter=city>",
        ["get_weather"],
    ),
    ("minimax_m2", "x <minimax:tool_call>\n<invoke", "x <minimax:tool_call>\n<invoke", []),
    ("minimax_m2", "<minimax:tool_call>garbage</minimax:tool_call>", "<minimax:tool_call>garbage", []),
    (
        "minimax_m2",
        '<minimax:tool_call><minimax:tool_call><invoke name="get_time"></invoke></minimax:tool_call>',
        "<minimax:tool_call>",
        ["get_time"],
    ),
    (
        "minimax_m2",
        '<minimax:tool_call><invoke name="f"><parameter name="a">1',
        '<parameter name="a">1',
        ["f"],
    ),
    (
        "minimax_m2",
        '<minimax:tool_call><invoke name="f"><parameter name="a">1</parameter><invoke name="g"></invoke>',
        "",
        ["f", "g"],
    ),
    (
        "deepseek_v3",
        DS_CALLS_B + DS_B + "function" + DS_SEP + 'get_weather\n```json\n{"city": oops}',
        "oops",
        ["get_weather"],
    ),
    ("deepseek_v3", DS_CALLS_B + "text inside", DS_CALLS_B + "text inside", []),
    ("deepseek_v3", DS_CALLS_B + DS_B + "get_time" + DS_SEP + "[1, 2]" + DS_E, "[1, 2]", []),
    (
        "glm4_moe",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
        "<arg_value>Par",
        ["get_weather"],
    ),
    ("glm4_moe", "<tool_call>{json} nope</tool_call>", "<tool_call>{json} nope</tool_call>", []),
    ("glm4_moe", "<tool_call>", "<tool_call>", []),
    ("kimi_k2", KM_S + _km("functions.get_weather:0", '{"city": oops}'), "oops", ["get_weather"]),
    ("kimi_k2", KM_S + "text inside", KM_S + "text inside", []),
    ("kimi_k2", KM_S + _km("functions.get_time:0", "[1, 2]"), "[1, 2]", []),
    ("kimi_k2", KM_S + KM_B + "functions.f:0" + KM_B, KM_B, []),
    (
        "kimi_k2",
        KM_S + _km("functions.get_time:0", '{"a": {"b": [1, {"c": "<|tool_call_end|>"'),
        "",
        ["get_time"],
    ),
]


@pytest.mark.parametrize(
    "fmt,text,must,names", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_never_raises(fmt, text, must, names):
    want = None
    for pieces in ([text], list(text), [text[: len(text) // 2], text[len(text) // 2 :]]):
        p = PARSERS[fmt](TOOLS)
        content, calls = _collect(_stream(p, pieces))
        assert must in content
        assert [c["name"] for _, c in sorted(calls.items())] == names
        for c in calls.values():
            assert isinstance(json.loads(c["args"]), dict)  # closed into valid JSON even when cut off
        assert p.called == bool(names)
        got = (content, [(c["name"], c["args"]) for _, c in sorted(calls.items())])
        assert want is None or got == want
        want = got


def _big_cases():
    big = "x" * 100_000
    return [
        ("hermes", '<tool_call>{"name": "write", "arguments": {"text": "' + big + '"}}</tool_call>'),
        ("hermes", '<tool_call>{"name": "write", "arguments": {"text": ["' + big + '"]}}</tool_call>'),
        ("deepseek_v3", DS_CALLS_B + _ds31("write", '{"text": "' + big + '"}') + DS_CALLS_E),
        (
            "minimax_m2",
            '<minimax:tool_call><invoke name="write"><parameter name="text">'
            + big
            + "</parameter></invoke></minimax:tool_call>",
        ),
        ("glm4_moe", "<tool_call>write<arg_key>text</arg_key><arg_value>" + big + "</arg_value></tool_call>"),
        ("kimi_k2", KM_S + _km("functions.write:0", '{"text": "' + big + '"}') + KM_SE),
    ], big


def test_huge_argument():
    cases, big = _big_cases()
    for fmt, text in cases:
        for step in (len(text), 997, 7):
            pieces = [text[i : i + step] for i in range(0, len(text), step)]
            content, calls = _collect(_stream(PARSERS[fmt](TOOLS), pieces))
            assert content == ""
            args = json.loads(calls[0]["args"])
            assert args["text"] in (big, [big])


def test_unclosed_huge_argument_is_kept_valid():
    p = PARSERS["hermes"](TOOLS)
    text = '<tool_call>{"name": "write", "arguments": {"text": "' + "y" * 100_000
    content, calls = _collect(_stream(p, [text[i : i + 4096] for i in range(0, len(text), 4096)]))
    assert json.loads(calls[0]["args"]) == {"text": "y" * 100_000} and content == ""


def test_coercion_by_schema():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "i": {"type": "integer"},
                        "n": {"type": "number"},
                        "b": {"type": "boolean"},
                        "o": {"type": "object"},
                        "a": {"type": "array"},
                        "s": {"type": "string"},
                        "bad": {"type": "integer"},
                        "u": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    },
                },
            },
        }
    ]
    params = {
        "i": " 42 ",
        "n": "1e3",
        "b": "false",
        "o": "{'k': 1}",
        "a": '[1, "x"]',
        "s": "007",
        "bad": "4x",
        "u": "none",
        "extra": "12",
    }
    body = "".join(f'<parameter name="{k}">{v}</parameter>' for k, v in params.items())
    _, calls = parse_whole(
        PARSERS["minimax_m2"],
        f'<minimax:tool_call><invoke name="f">{body}</invoke></minimax:tool_call>',
        tools,
    )
    assert json.loads(calls[0]["function"]["arguments"]) == {
        "i": 42,
        "n": 1000.0,
        "b": False,
        "o": {"k": 1},
        "a": [1, "x"],
        "s": "007",
        "bad": "4x",
        "u": None,
        "extra": "12",
    }


def test_text_after_calls_and_no_tools():
    content, calls = parse_whole(
        PARSERS["hermes"], '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nThe time is now.'
    )
    assert content == "The time is now." and len(calls) == 1
    p = PARSERS["glm4_moe"]()  # no tools: raw strings
    d = [p.feed("<tool_call>f<arg_key>n</arg_key><arg_value>3</arg_value></tool_call>"), p.finish()]
    assert json.loads("".join(tc.arguments for x in d for tc in x.tool_calls)) == {"n": "3"}


def test_registry():
    assert set(PARSERS) == {"minimax_m2", "hermes", "deepseek_v3", "glm4_moe", "kimi_k2"}
    for fam, fmt in [
        ("minimax_m2", "minimax_m2"),
        ("qwen3_moe", "hermes"),
        ("qwen2_moe", "hermes"),
        ("mixtral", "hermes"),
        ("deepseek_v3", "deepseek_v3"),
        ("kimi_k2", "kimi_k2"),
        ("glm4_moe", "glm4_moe"),
        ("glm4_moe_lite", "glm4_moe"),
        ("gpt_oss", None),
        ("llama", None),
    ]:
        assert parser_for_family(fam) == fmt
    for cls in PARSERS.values():
        assert issubclass(cls, ToolParser) and cls.markers
    p = PARSERS["hermes"]()
    assert p.finish() == ParseDelta() and p.finish() == ParseDelta() and not p.called
