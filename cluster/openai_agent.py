"""The agent side of the chat API: tool definitions and `tool_choice`, the messages as the chat template
reads them (tool calls, tool results, previous reasoning), and per choice the split of generated text into
reasoning, content and tool calls (emoe/reasoning.py, emoe/tool_parsers.py), streamed as OpenAI deltas.

`tool_choice` "required" or a named function is enforced by constrained decoding: a `GrammarSpec` of kind
"tool_call" that the engine compiles (router/engine/structured.py) into the family's call format with the
tool's JSON schema for the arguments, so even a random-weight model returns a schema-valid call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from emoe.api import GrammarSpec, InvalidRequest
from emoe.reasoning import REASONING_PARSERS, ReasoningParser, reasoning_parser_for_family
from emoe.tool_grammar import CONSTRAINED_FORMATS
from emoe.tool_parsers import PARSERS, ToolParser, parser_for_family

MAX_TOOLS = 128


@dataclass
class ToolSetup:
    """What a chat request asks of tools: the definitions (OpenAI's shape) the template renders and the
    parser coerces by, the mode ("auto", "none", "required", "named") and the forced function's name."""

    tools: list[dict] = field(default_factory=list)
    mode: str = "auto"
    name: str | None = None
    prior_calls: int = 0  # tool calls earlier in the conversation (Kimi-K2 numbers its calls from them)

    @property
    def parse(self) -> bool:
        return bool(self.tools) and self.mode != "none"


def tool_setup(tools: list[Any] | None, tool_choice: Any) -> ToolSetup:
    """Checks `tools` and `tool_choice` (400 naming the field) and returns the request's ToolSetup."""
    import jsonschema

    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest("tools", f"{len(tools)} tools, more than {MAX_TOOLS}")
    names: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(f"{where}.type", "only function tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"{where}.function.name", "a function needs a non-empty name")
        if fn["name"] in names:
            raise InvalidRequest(f"{where}.function.name", f"{fn['name']!r} is defined twice")
        names.add(fn["name"])
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidRequest(f"{where}.function.parameters", "must be a JSON schema object")
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
        except jsonschema.SchemaError as exc:
            raise InvalidRequest(
                f"{where}.function.parameters", f"not a valid JSON schema: {exc.message}"
            ) from None
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest("tool_choice", f"must be auto, none, required or a function, got {choice!r}")
        if choice == "required" and not out:
            raise InvalidRequest("tool_choice", "required needs at least one tool")
        return ToolSetup(out, choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequest("tool_choice", f"names the function {name!r}, which is not in tools")
        return ToolSetup(out, "named", name)
    raise InvalidRequest("tool_choice", "must be auto, none, required or {type: function, function: {name}}")


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The chat messages as templates read them: content text; an assistant's `tool_calls` with their
    arguments as objects (transformers' convention); tool results with `tool_call_id`; previous reasoning
    as both `reasoning_content` and `reasoning`. A tool result must answer a call made before it."""
    out: list[dict[str, Any]] = []
    called: set[str] = set()
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": m.content if m.content is not None else ""}
        if m.name:
            d["name"] = m.name
        thought = m.reasoning if m.reasoning is not None else m.reasoning_content
        if thought is not None:
            d["reasoning_content"] = d["reasoning"] = thought
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest(f"messages.{i}.tool_calls", "only assistant messages make tool calls")
            calls = []
            for j, call in enumerate(m.tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequest(
                        f"messages.{i}.tool_calls.{j}.function", "needs a name and arguments"
                    )
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise InvalidRequest(
                            f"messages.{i}.tool_calls.{j}.function.arguments", "not valid JSON"
                        ) from None
                cid = call.get("id") or f"call_{i}_{j}"
                called.add(cid)
                calls.append(
                    {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}}
                )
            d["tool_calls"] = calls
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest(f"messages.{i}.tool_call_id", "a tool result needs the id of its call")
            if m.tool_call_id not in called:
                raise InvalidRequest(
                    f"messages.{i}.tool_call_id", f"{m.tool_call_id!r} answers no earlier assistant tool call"
                )
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


HARMONY = "harmony"  # gpt-oss: prompts rendered and outputs parsed by openai-harmony (emoe/harmony.py)


def tool_format(family: str, override: str | None = None) -> str | None:
    """The tool-call format of a family (the config's `tool_call_parser` overrides it)."""
    auto = HARMONY if family == "gpt_oss" else parser_for_family(family)
    name = override if override and override != "auto" else auto
    if name is not None and name != HARMONY and name not in PARSERS:
        raise ValueError(f"tool_call_parser {name!r}: one of {', '.join(sorted([*PARSERS, HARMONY]))}")
    return name


def harmony_prompt(messages: list[dict], tools: list[dict] | None, effort: str, info, tokenizer):
    """gpt-oss: (prompt ids, their text) of the conversation rendered by openai-harmony (no jinja)."""
    from emoe.api import validate_prompt
    from emoe.harmony import render_prompt

    try:
        ids = render_prompt(messages, tools, reasoning_effort=effort)
    except ValueError as exc:
        raise InvalidRequest(
            "reasoning_effort" if "reasoning_effort" in str(exc) else "messages", str(exc)
        ) from exc
    except RuntimeError as exc:  # the harmony encoding does not load here
        raise InvalidRequest("messages", f"the harmony format is unavailable: {exc}") from exc
    try:
        ids = validate_prompt(info, None, ids, tokenizer.encode)
    except InvalidRequest as exc:
        raise InvalidRequest("messages", str(exc).split(": ", 1)[-1]) from exc
    return ids, tokenizer.decode(ids, skip_special_tokens=False)


def harmony_stop_ids() -> tuple[int, ...]:
    """The tokens that end an assistant's action in harmony (<|return|>, <|call|>)."""
    from emoe.harmony import load_encoding

    return tuple(load_encoding().stop_tokens_for_assistant_actions())


def reasoning_format(family: str, override: str | None = None) -> str | None:
    name = override if override and override != "auto" else reasoning_parser_for_family(family)
    if name == "none":
        return None
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser {name!r}: one of {', '.join(sorted(REASONING_PARSERS))}")
    return name


def forced_call_grammar(setup: ToolSetup, fmt: str | None) -> GrammarSpec | None:
    """The constraint of tool_choice required / named: one call (of the named tool, or of any) in the
    family's format, its arguments valid under the tool's schema."""
    if setup.mode not in ("required", "named"):
        return None
    if fmt not in CONSTRAINED_FORMATS:
        raise InvalidRequest(
            "tool_choice",
            f"{setup.mode} needs constrained decoding, which the {fmt or 'no'} tool-call format does not have "
            f"here (supported: {', '.join(CONSTRAINED_FORMATS)}); use auto",
        )
    fns = [
        t["function"] for t in setup.tools if setup.mode == "required" or t["function"]["name"] == setup.name
    ]
    spec = {
        "format": fmt,
        "tools": [{"name": f["name"], "parameters": f["parameters"]} for f in fns],
        "first_index": setup.prior_calls,
    }
    return GrammarSpec("tool_call", json.dumps(spec), field="tool_choice")


class ChoiceOutput:
    """One choice's generated text split into reasoning, content and tool calls, as it streams."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None):
        self.reasoning, self.tools = reasoning, tools
        self.text: list[str] = []
        self.thought: list[str] = []
        self.calls: dict[int, dict] = {}

    def feed(self, text: str, final: bool = False, token_ids: Any = ()) -> dict[str, Any]:
        """The OpenAI delta fields (reasoning_content / reasoning, content, tool_calls) of `text` (the
        chunk's `token_ids` are for formats parsed by token, harmony's)."""
        thought, content = text, ""
        if self.reasoning is not None:
            r = self.reasoning.feed(text)
            thought, content = r.reasoning, r.content
            if final:
                end = self.reasoning.finish()
                thought, content = thought + end.reasoning, content + end.content
        else:
            thought, content = "", text
        calls = []
        if self.tools is not None:
            parsed = self.tools.feed(content)
            content, calls = parsed.content, list(parsed.tool_calls)
            if final:
                end = self.tools.finish()
                content, calls = content + end.content, calls + list(end.tool_calls)
        return self._delta(thought, content, calls)

    def _delta(self, thought: str, content: str, calls: list) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if thought:
            self.thought.append(thought)
            delta["reasoning_content"] = delta["reasoning"] = thought
        if content:
            self.text.append(content)
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [self._call_delta(c) for c in calls]
        return delta

    def _call_delta(self, c) -> dict[str, Any]:
        whole = self.calls.setdefault(
            c.index, {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
        )
        whole["function"]["arguments"] += c.arguments
        out: dict[str, Any] = {"index": c.index}
        if c.id is not None:
            out |= {"id": c.id, "type": "function"}
        fn: dict[str, Any] = {"arguments": c.arguments}
        if c.name is not None:
            fn["name"] = c.name
        out["function"] = fn
        return out

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def message(self) -> dict[str, Any]:
        """The whole choice as a chat completion message."""
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if (self.text or not self.calls) else None,
        }
        if self.thought:
            msg["reasoning_content"] = msg["reasoning"] = "".join(self.thought)
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return msg


_MARKER_START = re.compile(r"<(?:\|[A-Za-z0-9_]*\|?)?$")  # the start of a harmony `<|name|>` at the end


class HarmonyOutput(ChoiceOutput):
    """gpt-oss: a choice's output parsed by openai-harmony (emoe.harmony.HarmonyStream): the analysis
    channel is reasoning, the final channel content, commentary to functions.NAME a tool call (surfaced
    only when the request has tools).

    It reads the text (decoded with special tokens) and has harmony encode it again, so a marker spelled in
    ordinary tokens (`<`, `|channel`, `|>`: what a grammar may let a model write) parses like the marker
    token; a possible marker cut by a chunk boundary is held back until it is whole."""

    MAX_MARKER = 32

    def __init__(self, tools: list[dict] | None):
        from emoe.harmony import HarmonyStream, load_encoding

        super().__init__(None, None)
        self.stream, self.with_tools = HarmonyStream(tools), tools is not None
        self.enc = load_encoding()
        self.held = ""

    def feed(self, text: str, final: bool = False, token_ids: Any = ()) -> dict[str, Any]:
        buf, self.held = self.held + text, ""
        tail = None if final else _MARKER_START.search(buf[-self.MAX_MARKER :])
        if tail is not None:  # `<`, `<|`, `<|chan`, `<|channel|` may still become a marker
            cut = len(buf) - len(tail.group())
            buf, self.held = buf[:cut], buf[cut:]
        d = self.stream.feed_tokens(self.enc.encode(buf, allowed_special="all") if buf else [])
        if final:
            d.extend(self.stream.finish())
        return self._delta(d.reasoning, d.content, d.tool_calls if self.with_tools else [])


def choice_output_factory(setup: ToolSetup, tool_fmt: str | None, reasoning_fmt: str | None, prompt: str):
    """A maker of ChoiceOutput for each choice of a request, or None when there is nothing to split."""
    parse_tools = setup.parse and tool_fmt is not None
    if tool_fmt == HARMONY:  # harmony's channels are always parsed: reasoning, content and calls
        tools = setup.tools if parse_tools else None
        return lambda: HarmonyOutput(tools)
    if setup.mode in ("required", "named"):
        reasoning_fmt = None  # the grammar makes the output a call from its first token: no reasoning
    if not parse_tools and reasoning_fmt is None:
        return None

    def make() -> ChoiceOutput:
        reasoning = REASONING_PARSERS[reasoning_fmt](prompt_text=prompt) if reasoning_fmt else None
        tools = PARSERS[tool_fmt](setup.tools) if parse_tools else None
        return ChoiceOutput(reasoning, tools)

    return make
