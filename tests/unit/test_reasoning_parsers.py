"""Reasoning parser: <think>...</think> split off the answer, the same for whole outputs and any chunking."""

from __future__ import annotations

import random

import pytest

from emoe.reasoning import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    reasoning_parser_for_family,
    split_reasoning,
)

R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"
CLOSED_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

# (output, starts_in_reasoning, prompt_text, expected (reasoning, content))
CASES = [
    # normal
    ("<think>r</think>answer", None, "", ("r", "answer")),
    (
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        None,
        "",
        ("Let me think.\n", "The answer is 4."),
    ),
    (" \n<think>\nr</think> a", None, "", ("r", "a")),
    ("<think>\r\nr</think>\r\na", None, "", ("r", "a")),
    ("<think>\n\nr</think>a", None, "", ("\nr", "a")),
    ("<think>思考 ✓</think>答案", None, "", ("思考 ✓", "答案")),
    # template-opened
    ("Let me think.</think>\n\nFour.", True, "", ("Let me think.", "Four.")),
    ("\nLet me think.</think>\n\nFour.", True, "", ("Let me think.", "Four.")),
    ("Let me think.</think>\n\nFour.", None, R1_PROMPT, ("Let me think.", "Four.")),
    ("  indented</think>x", True, "", ("  indented", "x")),
    ("</think>x", True, "", ("", "x")),
    ("\n</think>\n\nx", True, "", ("", "x")),
    # stray <think> although the template opened the block
    ("<think>\nhmm</think>ok", True, "", ("hmm", "ok")),
    ("  \n<think>hmm</think>ok", True, "", ("hmm", "ok")),
    ("<think>\nhmm</think>ok", None, R1_PROMPT, ("hmm", "ok")),
    ("<think><think>r</think>x", True, "", ("<think>r", "x")),
    # no think at all
    ("Just an answer.", None, "", ("", "Just an answer.")),
    ("  \nhi", None, "", ("", "  \nhi")),
    ("Hello", None, CLOSED_PROMPT, ("", "Hello")),
    ("<html>page</html>", None, "", ("", "<html>page</html>")),
    ("<thinking>hi", None, "", ("", "<thinking>hi")),
    ("a < b > c", None, "", ("", "a < b > c")),
    ("", None, "", ("", "")),
    ("   ", None, "", ("", "   ")),
    ("<", None, "", ("", "<")),
    ("<thi", None, "", ("", "<thi")),
    ("</think>x", None, "", ("", "</think>x")),
    # unclosed
    ("<think>still going", None, "", ("still going", "")),
    ("still going", True, "", ("still going", "")),
    ("<think>still </thi", None, "", ("still </thi", "")),
    ("<think>", None, "", ("", "")),
    ("<think>\n", None, "", ("", "")),
    ("", True, "", ("", "")),
    ("\n", True, "", ("", "")),
    ("<thi", True, "", ("<thi", "")),
    # think after content is content
    ("Answer <think>x</think> more", None, "", ("", "Answer <think>x</think> more")),
    ("a\n<think>r</think>b", None, "", ("", "a\n<think>r</think>b")),
    ("\n\n<think>r</think>a", None, "", ("r", "a")),
    ("<think>r</think>a<think>s</think>b", None, "", ("r", "a<think>s</think>b")),
    ("r</think><think>s</think>b", True, "", ("r", "<think>s</think>b")),
    # nested / repeated
    ("<think>a<think>b</think>c</think>d", None, "", ("a<think>b", "c</think>d")),
    ("<think>r</think>a</think>b", None, "", ("r", "a</think>b")),
    ("<think>r</think></think>b", None, "", ("r", "</think>b")),
    ("<think><think></think></think>", None, "", ("<think>", "</think>")),
    ("<think>a</</think>b", None, "", ("a</", "b")),
    ("<think>a<</think>b", None, "", ("a<", "b")),
    ("<think>a</think</think>b", None, "", ("a</think", "b")),
    # empty reasoning
    ("<think></think>x", None, "", ("", "x")),
    ("<think>\n\n</think>\n\nx", None, "", ("\n", "x")),
    ("<think></think>", None, "", ("", "")),
]

IDS = [repr(c[0])[:40] + ("/opened" if c[1] or c[2] else "") for c in CASES]


def stream(
    chunks: list[str], starts_in_reasoning=None, prompt_text: str = ""
) -> tuple[list[ReasoningDelta], tuple[str, str]]:
    parser = ReasoningParser(prompt_text, starts_in_reasoning)
    deltas = [parser.feed(c) for c in chunks]
    deltas.append(parser.finish())
    joined = "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)
    return deltas, joined


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(0, 5)  # 0: an empty feed now and then
        chunks.append(text[i : i + n])
        i += n
    return chunks


def chunkings(text: str, seed: int = 0):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(25):
        yield random_chunks(text, rng)


def reference(text: str, opened: bool) -> tuple[str, str]:
    """The rules, written directly on the whole output."""
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        body = stripped[len("<think>") :]
    elif opened:
        body = text
    else:
        return "", text
    if body.startswith("\r\n"):
        body = body[2:]
    elif body.startswith("\n"):
        body = body[1:]
    i = body.find("</think>")
    if i < 0:
        return body, ""
    return body[:i], body[i + len("</think>") :].lstrip()


@pytest.mark.parametrize("text,opened,prompt,expected", CASES, ids=IDS)
def test_whole_output(text, opened, prompt, expected):
    assert split_reasoning(text, prompt, opened) == expected
    is_opened = opened if opened is not None else ReasoningParser.prompt_opens_reasoning(prompt)
    assert reference(text, is_opened) == expected


@pytest.mark.parametrize("text,opened,prompt,expected", CASES, ids=IDS)
def test_any_chunking_gives_the_whole_output_result(text, opened, prompt, expected):
    for n, chunks in enumerate(chunkings(text, seed=len(text))):
        _, joined = stream(chunks, opened, prompt)
        assert joined == expected, (n, chunks)


# outputs whose only '<', '/' and '>' are tags consumed as tags
CLEAN = [
    ("<think>r</think>answer", None),
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", None),
    (" \n<think>\nr</think> a", None),
    ("Let me think.</think>\n\nFour.", True),
    ("<think>\nhmm</think>ok", True),
    ("  \n<think>hmm</think>ok", True),
    ("<think></think>x", None),
    ("</think>x", True),
    ("<think>unclosed reasoning", None),
]


@pytest.mark.parametrize("text,opened", CLEAN)
def test_no_delta_holds_part_of_a_consumed_tag(text, opened):
    for chunks in chunkings(text, seed=7):
        deltas, _ = stream(chunks, opened)
        for d in deltas:
            for piece in (d.reasoning, d.content):
                assert not any(ch in piece for ch in "</>"), (chunks, d)


def test_partial_tags_are_held_then_resolved():
    p = ReasoningParser()
    assert p.feed("<thi") == ReasoningDelta()
    assert not p.in_reasoning
    assert p.feed("nk>\nabc</thi") == ReasoningDelta(reasoning="abc")
    assert p.in_reasoning
    assert p.feed("nk>") == ReasoningDelta()
    assert not p.in_reasoning
    assert p.feed("\n\n") == ReasoningDelta()
    assert p.feed("Answer") == ReasoningDelta(content="Answer")
    assert p.feed(" </thi") == ReasoningDelta(content=" </thi")
    assert p.finish() == ReasoningDelta()


def test_partial_end_tag_that_is_not_a_tag_goes_back_to_reasoning():
    p = ReasoningParser(starts_in_reasoning=True)
    assert p.in_reasoning
    assert p.feed("a </th") == ReasoningDelta(reasoning="a ")
    assert p.feed("ere") == ReasoningDelta(reasoning="</there")
    assert p.feed("</") == ReasoningDelta()
    assert p.finish() == ReasoningDelta(reasoning="</")


def test_content_without_think_is_not_delayed():
    p = ReasoningParser()
    assert p.feed("Hi") == ReasoningDelta(content="Hi")
    assert p.feed(" <think>") == ReasoningDelta(content=" <think>")


def test_starts_in_reasoning_from_prompt():
    assert ReasoningParser(R1_PROMPT).in_reasoning
    assert ReasoningParser("</think> earlier turn <think>\n").in_reasoning
    assert not ReasoningParser(CLOSED_PROMPT).in_reasoning
    assert not ReasoningParser("plain prompt").in_reasoning
    assert not ReasoningParser("").in_reasoning
    assert not ReasoningParser(R1_PROMPT, starts_in_reasoning=False).in_reasoning
    assert ReasoningParser("", starts_in_reasoning=True).in_reasoning
    # the explicit flag wins over the prompt
    assert split_reasoning("<think>r</think>a", R1_PROMPT, False) == ("r", "a")
    assert split_reasoning("plain", R1_PROMPT, False) == ("", "plain")


TOKENS = ["<think>", "</think>", "<", "/", "think", ">", "<th", "</thi", "nk>", "\n", "\r", " ", "a", "é"]


@pytest.mark.parametrize("opened", [False, True])
def test_fuzz_against_reference(opened):
    rng = random.Random(1234 + opened)
    for _ in range(300):
        text = "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 12)))
        expected = reference(text, opened)
        assert split_reasoning(text, starts_in_reasoning=opened) == expected, text
        for _ in range(4):
            chunks = random_chunks(text, rng)
            assert stream(chunks, opened)[1] == expected, (text, chunks)
        assert stream(list(text), opened)[1] == expected, text


def test_odd_input_never_raises():
    p = ReasoningParser()
    assert p.feed("") == ReasoningDelta()
    assert p.feed(None) == ReasoningDelta()  # type: ignore[arg-type]
    p.finish()
    p.finish()
    assert split_reasoning("</think></think><think><think>") == ("", "</think></think><think><think>")


def test_registry_and_family_mapping():
    assert REASONING_PARSERS["think"] is ReasoningParser
    for family in ("minimax_m2", "deepseek_v3", "kimi_k2", "qwen3_moe", "glm4_moe", "glm4_moe_lite"):
        name = reasoning_parser_for_family(family)
        assert name == "think", family
        assert name in REASONING_PARSERS
    for family in ("mixtral", "qwen2_moe", "gpt_oss", "unknown_family", ""):
        assert reasoning_parser_for_family(family) is None, family
