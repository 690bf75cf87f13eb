"""Grammars of a forced tool call (tool_choice "required" or a named function), in a family's call format,
for xgrammar: the fixed markup as literals, the arguments under each tool's JSON schema. The engine compiles
them like any structured output (router/engine/structured.py, GrammarSpec kind "tool_call").

Formats (the same ones emoe/tool_parsers.py reads back):
- minimax_m2: <minimax:tool_call>\\n<invoke name="f">\\n<parameter name="k">v</parameter>\\n...</invoke>\\n
  </minimax:tool_call>; a string value is raw text without "<" (one of its enum, or its pattern, where the
  schema has them), any other value compact JSON under its schema; the schema's required parameters, in
  its order.
- hermes (Qwen, Hermes): <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>.
"""

from __future__ import annotations

import json
from typing import Any

CONSTRAINED_FORMATS = ("minimax_m2", "hermes")


def tool_call_grammar(fmt: str, tools: list[dict[str, Any]]):
    """One call of one of `tools` ([{"name", "parameters"}]) in format `fmt`, as an xgrammar Grammar."""
    import xgrammar as xgr

    if fmt not in CONSTRAINED_FORMATS:
        raise ValueError(f"no forced-call grammar for the {fmt!r} format")
    if not tools:
        raise ValueError("no tools")
    build = _minimax if fmt == "minimax_m2" else _hermes
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


def _minimax(name: str, params: dict):
    import xgrammar as xgr

    parts = [_lit(f'<minimax:tool_call>\n<invoke name="{name}">\n')]
    props = params.get("properties") or {}
    for key in [k for k in props if k in set(params.get("required") or [])]:
        prop = props[key] if isinstance(props[key], dict) else {}
        parts.append(_lit(f'<parameter name="{key}">'))
        if prop.get("type") == "string" and isinstance(prop.get("enum"), list) and prop["enum"]:
            parts.append(xgr.Grammar.union(*(_lit(str(v)) for v in prop["enum"])))
        elif prop.get("type") == "string" and isinstance(prop.get("pattern"), str):
            parts.append(xgr.Grammar.from_regex(prop["pattern"]))
        elif prop.get("type") == "string":  # raw text, as MiniMax writes string values; maxLength honoured
            most = prop.get("maxLength")
            bound = f"{{{int(prop.get('minLength', 0))},{int(most)}}}" if isinstance(most, int) else "*"
            parts.append(xgr.Grammar.from_regex(f"[^<]{bound}"))
        else:
            parts.append(_json(prop))
        parts.append(_lit("</parameter>\n"))
    parts.append(_lit("</invoke>\n</minimax:tool_call>"))
    return xgr.Grammar.concat(*parts)
