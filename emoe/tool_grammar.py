"""Grammars of a forced tool call (tool_choice "required" or a named function), in a family's call format,
for xgrammar: the fixed markup as literals, the arguments under each tool's JSON schema. The engine compiles
them like any structured output (router/engine/structured.py, GrammarSpec kind "tool_call").

Formats (the same ones emoe/tool_parsers.py reads back):
- minimax_m2: <minimax:tool_call>\\n<invoke name="f">\\n<parameter name="k">v</parameter>\\n...</invoke>\\n
  </minimax:tool_call>; a string value is raw text without "<" (one of its enum, or its pattern, where the
  schema has them), any other value compact JSON under its schema; the schema's required parameters, in
  its order.
- hermes (Qwen, Hermes): <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>.
- deepseek_v3: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜><｜tool▁calls▁end｜> (V3 / R1's form, which the parser reads with V3.1's).
- glm4_moe: <tool_call>f\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n...</tool_call>, values as in
  minimax_m2 (a string raw, anything else JSON).
- kimi_k2: <|tool_calls_section_begin|><|tool_call_begin|>functions.f:N<|tool_call_argument_begin|>{...}
  <|tool_call_end|><|tool_calls_section_end|>, N counting the conversation's earlier calls.
- harmony (gpt-oss): after the generation prompt's <|start|>assistant, " to=functions.f<|channel|>commentary
  <|constrain|>json<|message|>{...}" (the request ends with the arguments; the parser closes the call).
The markers are literals: a vocabulary that has one as a single (special) token matches it with that token
or with its characters; xgrammar allows both.
"""

from __future__ import annotations

import functools
import json
from typing import Any

CONSTRAINED_FORMATS = ("minimax_m2", "hermes", "deepseek_v3", "glm4_moe", "kimi_k2", "harmony")


def tool_call_grammar(fmt: str, tools: list[dict[str, Any]], first_index: int = 0):
    """One call of one of `tools` ([{"name", "parameters"}]) in format `fmt`, as an xgrammar Grammar
    (`first_index`: the calls made earlier in the conversation, which Kimi-K2's call ids count)."""
    import xgrammar as xgr

    if fmt not in CONSTRAINED_FORMATS:
        raise ValueError(f"no forced-call grammar for the {fmt!r} format")
    if not tools:
        raise ValueError("no tools")
    build = {
        "minimax_m2": _minimax,
        "hermes": _hermes,
        "deepseek_v3": _deepseek,
        "glm4_moe": _glm,
        "kimi_k2": _kimi,
        "harmony": _harmony,
    }[fmt]
    if fmt == "kimi_k2":
        build = functools.partial(_kimi, index=int(first_index))
    calls = [build(t["name"], t.get("parameters") or {}) for t in tools]
    return calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)


def _lit(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _json(schema: dict):
    import xgrammar as xgr

    return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)


def _hermes(name: str, params: dict):
    import xgrammar as xgr

    head = _lit('<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ')
    return xgr.Grammar.concat(head, _json(params), _lit("}\n</tool_call>"))


def _deepseek(name: str, params: dict):
    import xgrammar as xgr

    head = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>" + name + "\n```json\n"
    return xgr.Grammar.concat(_lit(head), _json(params), _lit("\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"))


def _kimi(name: str, params: dict, index: int = 0):
    import xgrammar as xgr

    head = (
        f"<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>"
    )
    return xgr.Grammar.concat(_lit(head), _json(params), _lit("<|tool_call_end|><|tool_calls_section_end|>"))


def _harmony(name: str, params: dict):
    import xgrammar as xgr

    # after the prompt's "<|start|>assistant": the call header as openai-harmony renders it, then the JSON
    head = f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>"
    return xgr.Grammar.concat(_lit(head), _json(params))


def _xml_value(prop: dict):
    """A parameter's value in the XML formats: a string raw (without "<"), anything else JSON."""
    import xgrammar as xgr

    if prop.get("type") == "string" and isinstance(prop.get("enum"), list) and prop["enum"]:
        return xgr.Grammar.union(*(_lit(str(v)) for v in prop["enum"]))
    if prop.get("type") == "string" and isinstance(prop.get("pattern"), str):
        return xgr.Grammar.from_regex(prop["pattern"])
    if prop.get("type") == "string":  # raw text, as these formats write string values; maxLength honoured
        most = prop.get("maxLength")
        bound = f"{{{int(prop.get('minLength', 0))},{int(most)}}}" if isinstance(most, int) else "*"
        return xgr.Grammar.from_regex(f"[^<]{bound}")
    return _json(prop)


def _required(params: dict) -> list[tuple[str, dict]]:
    """The schema's required parameters, in its order."""
    props = params.get("properties") or {}
    need = set(params.get("required") or [])
    return [(k, props[k] if isinstance(props[k], dict) else {}) for k in props if k in need]


def _minimax(name: str, params: dict):
    import xgrammar as xgr

    parts = [_lit(f'<minimax:tool_call>\n<invoke name="{name}">\n')]
    for key, prop in _required(params):
        parts += [_lit(f'<parameter name="{key}">'), _xml_value(prop), _lit("</parameter>\n")]
    parts.append(_lit("</invoke>\n</minimax:tool_call>"))
    return xgr.Grammar.concat(*parts)


def _glm(name: str, params: dict):
    import xgrammar as xgr

    parts = [_lit(f"<tool_call>{name}\n")]
    for key, prop in _required(params):
        parts += [_lit(f"<arg_key>{key}</arg_key>\n<arg_value>"), _xml_value(prop), _lit("</arg_value>\n")]
    parts.append(_lit("</tool_call>"))
    return xgr.Grammar.concat(*parts)
