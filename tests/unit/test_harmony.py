"""emoe.harmony: gpt-oss's harmony format through the openai-harmony library (rendering and streaming parse).

These tests need openai-harmony and the o200k_base vocabulary (rebuilt offline from the quicktok-v1 wheel);
where either is missing they fail, naming the missing piece, rather than skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from emoe import harmony
from emoe.harmony import HarmonyDelta, HarmonyStream, harmony_available, render_prompt
from emoe.tool_parsers import ToolCallDelta

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def enc():
    if not harmony_available():
        pytest.fail("harmony is unavailable here: " + harmony.harmony_unavailable_reason())
    return harmony.load_encoding()


def _assistant_tokens(enc, *messages) -> list[int]:
    """What the model would generate after a prompt ending in `<|start|>assistant`: the messages rendered by
    harmony itself, with the first message's `<|start|>assistant` header dropped."""
    toks: list[int] = []
    for m in messages:
        toks += enc.render(m)
    head = enc.encode("<|start|>assistant", allowed_special="all")
    assert toks[: len(head)] == head
    return toks[len(head) :]


def _feed(stream: HarmonyStream, toks: list[int]) -> list[HarmonyDelta]:
    out = [stream.feed_token(t) for t in toks]
    out.append(stream.finish())
    return out


def _calls(deltas: list[HarmonyDelta]) -> list[ToolCallDelta]:
    return [c for d in deltas for c in d.tool_calls]


def _assistant(text: str, channel: str, recipient: str | None = None, json_args: bool = False):
    import openai_harmony as oh

    m = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient)
    if json_args:
        m = m.with_content_type("<|constrain|>json")
    return m


def test_harmony_available():
    assert harmony_available(), harmony.harmony_unavailable_reason()
    assert harmony.harmony_unavailable_reason() == ""


def test_vocab_rebuilt_offline_from_quicktok(tmp_path, monkeypatch):
    src = harmony._quicktok_vocab_path()
    if src is None:
        pytest.fail("the quicktok-v1 package (which ships the o200k vocabulary) is not installed")
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("EMOE_TIKTOKEN_DIR", str(tmp_path))
    assert harmony._provide_vocab() == str(tmp_path)
    f = tmp_path / harmony.O200K_FILE
    assert hashlib.sha256(f.read_bytes()).hexdigest() == harmony.O200K_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(tmp_path)
    # a second call reuses the verified copy
    mtime = f.stat().st_mtime_ns
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    assert harmony._provide_vocab() == str(tmp_path)
    assert f.stat().st_mtime_ns == mtime


def test_render_conversation_with_tools_and_tool_result(enc):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call get_weather for Paris.",
            "tool_calls": [
                {
                    "id": "call_0123456789abcdef01234567",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": '{"temp": 20}'},
    ]
    ids = render_prompt(messages, tools=TOOLS, reasoning_effort="high")
    assert all(isinstance(t, int) for t in ids)
    text = enc.decode(ids)
    assert text.startswith("<|start|>system<|message|>")
    assert "Reasoning: high" in text
    assert "# Valid channels: analysis, commentary, final." in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief." in text
    assert "## functions\n\nnamespace functions {" in text
    assert "// Get the current weather in a city\ntype get_weather = (_: {" in text
    assert '"celsius" | "fahrenheit"' in text
    assert "<|start|>user<|message|>What's the weather in Paris?<|end|>" in text
    # the current turn's reasoning before the tool call is kept
    assert (
        "<|start|>assistant<|channel|>analysis<|message|>I should call get_weather for Paris.<|end|>" in text
    )
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>'
    ) in text
    # the tool's name comes from the earlier call's id
    assert (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'
        in text
    )
    assert text.endswith("<|start|>assistant")
    assert text.index("<|start|>developer") < text.index("<|start|>user")


def test_render_drops_reasoning_of_finished_turns(enc):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Bye"},
    ]
    text = enc.decode(render_prompt(messages))
    assert "Reasoning: medium" in text
    assert "The user greets me." not in text
    assert "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>" in text
    assert "<|start|>developer" not in text  # no instructions, no tools
    assert text.endswith("<|start|>user<|message|>Bye<|end|><|start|>assistant")


def test_render_rejects_bad_effort_and_unnamed_tool_result(enc):
    with pytest.raises(ValueError):
        render_prompt([{"role": "user", "content": "x"}], reasoning_effort="extreme")
    with pytest.raises(ValueError):
        render_prompt([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}])


def test_stop_token_ids(enc):
    s = HarmonyStream(TOOLS)
    want = set(enc.encode("<|return|><|call|>", allowed_special="all"))
    assert set(s.stop_token_ids) == want
    assert s.called is False


def test_stream_reasoning_tool_call_and_final(enc):
    args = '{"city": "Paris", "unit": "celsius"}'
    toks = _assistant_tokens(
        enc,
        _assistant("The user wants the weather; call get_weather.", "analysis"),
        _assistant(args, "commentary", "functions.get_weather", json_args=True),
        _assistant("It is 20 degrees in Paris.", "final"),
    )
    s = HarmonyStream(TOOLS)
    deltas = _feed(s, toks)
    assert "".join(d.reasoning for d in deltas) == "The user wants the weather; call get_weather."
    assert "".join(d.content for d in deltas) == "It is 20 degrees in Paris."
    calls = _calls(deltas)
    first, rest = calls[0], calls[1:]
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.id)
    assert first.name == "get_weather" and first.index == 0 and first.arguments == ""
    assert len(rest) > 1  # the arguments streamed in several fragments
    assert all(c.id is None and c.name is None and c.index == 0 for c in rest)
    assert "".join(c.arguments for c in calls) == args
    assert json.loads(args) == {"city": "Paris", "unit": "celsius"}
    assert s.called is True
    # reasoning came before the call, which came before the content
    kinds = []
    for d in deltas:
        for k in ("reasoning", "tool_calls", "content"):
            if getattr(d, k) and (not kinds or kinds[-1] != k):
                kinds.append(k)
    assert kinds == ["reasoning", "tool_calls", "content"]


def test_stream_stops_at_call_token(enc):
    toks = _assistant_tokens(
        enc,
        _assistant("Need weather.", "analysis"),
        _assistant('{"city": "Oslo"}', "commentary", "functions.get_weather", json_args=True),
    )
    call_tok = enc.encode("<|call|>", allowed_special="all")[0]
    assert toks[-1] == call_tok
    s = HarmonyStream(TOOLS)
    deltas = _feed(s, toks)
    assert "".join(c.arguments for c in _calls(deltas)) == '{"city": "Oslo"}'
    assert "".join(d.content for d in deltas) == ""


def test_stream_parallel_calls_and_call_without_arguments(enc):
    toks = _assistant_tokens(
        enc,
        _assistant('{"city": "Rome"}', "commentary", "functions.get_weather", json_args=True),
        _assistant("", "commentary", "functions.get_time", json_args=True),
    )
    s = HarmonyStream()
    calls = _calls(_feed(s, toks))
    heads = [c for c in calls if c.id]
    assert [(c.index, c.name) for c in heads] == [(0, "get_weather"), (1, "get_time")]
    assert heads[0].id != heads[1].id
    by_index = {}
    for c in calls:
        by_index[c.index] = by_index.get(c.index, "") + c.arguments
    assert by_index == {0: '{"city": "Rome"}', 1: "{}"}


def test_stream_preamble_is_content_and_unicode_survives(enc):
    text = "Checking 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — 天気 🌦️ now."
    toks = _assistant_tokens(
        enc,
        _assistant("思考: 𝔘 🌦️", "analysis"),
        _assistant(text, "commentary"),
    )
    deltas = _feed(HarmonyStream(TOOLS), toks)
    assert "".join(d.reasoning for d in deltas) == "思考: 𝔘 🌦️"
    assert "".join(d.content for d in deltas) == text
    assert not _calls(deltas)


def test_stream_never_raises_on_malformed_or_truncated_output(enc):
    s = HarmonyStream(TOOLS)
    junk = enc.encode("<|end|><|message|>hello<|channel|><|call|>", allowed_special="all")
    for t in junk:
        assert isinstance(s.feed_token(t), HarmonyDelta)
    s.finish()
    # truncated in the middle of a call: the name was still delivered first
    toks = _assistant_tokens(
        enc, _assistant('{"city": "Lima", "unit": "celsius"}', "commentary", "functions.get_weather", True)
    )
    s = HarmonyStream(TOOLS)
    deltas = [s.feed_token(t) for t in toks[:-4]] + [s.finish()]
    calls = _calls(deltas)
    assert calls[0].name == "get_weather" and s.called
    streamed = "".join(c.arguments for c in calls)
    assert streamed and '{"city": "Lima", "unit": "celsius"}'.startswith(streamed)
