"""Streaming parsers that turn a model's generated text into OpenAI-style tool calls.

One class per call format, written from the formats the models' chat templates render:

- ``minimax_m2``: ``<minimax:tool_call><invoke name="f"><parameter name="k">v</parameter></invoke>
  ...</minimax:tool_call>`` (several invokes in one block are parallel calls).
- ``hermes`` (Qwen2.5/Qwen3, Hermes, Mixtral): ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``,
  and Qwen3-Coder's XML body ``<tool_call><function=f><parameter=k>v</parameter></function></tool_call>``.
- ``deepseek_v3``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜><｜tool▁calls▁end｜>`` (V3 / R1) and ``...<｜tool▁call▁begin｜>f<｜tool▁sep｜>{...}
  <｜tool▁call▁end｜>...`` (V3.1).
- ``glm4_moe``: ``<tool_call>f\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>``.
- ``kimi_k2``: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{...}
  <|tool_call_end|><|tool_calls_section_end|>`` (the head ``functions.f:N`` is also the call's id).

Usage: ``p = PARSERS[fmt](tools)``; ``p.feed(new_text)`` per generated piece and ``p.finish()`` at the end; each
returns a ``ParseDelta`` (content text, tool-call deltas). Guarantees:

- Text that may still become a marker is held back; anything else is content at once.
- A call's first delta carries its id and name; its arguments follow as fragments whose concatenation is
  a JSON object. JSON formats stream string values as they arrive; the XML formats emit ``{``, then each
  ``"key": value`` once its parameter closes (values coerced to the tool's JSON-schema types), then ``}``.
- The result does not depend on how the text is split into pieces.
- Nothing raises on malformed output: what cannot be parsed is content (at ``finish`` at the latest). A call
  is committed once its name is known (and, for JSON formats, its arguments object opened); if the text
  ends inside it, its arguments are closed so they stay valid JSON and the unparsed rest becomes content.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PARSERS",
    "DeepSeekV3ToolParser",
    "Glm4MoeToolParser",
    "HermesToolParser",
    "KimiK2ToolParser",
    "MiniMaxM2ToolParser",
    "ParseDelta",
    "ToolCallDelta",
    "ToolParser",
    "parse_whole",
    "parser_for_family",
]


@dataclass
class ToolCallDelta:
    index: int  # which call of this response (0, 1, ... for parallel calls)
    id: str | None = None  # set on the call's first delta only
    name: str | None = None  # set on the call's first delta only
    arguments: str = ""  # a fragment of the arguments' JSON text


@dataclass
class ParseDelta:
    content: str = ""  # plain text that is not part of a tool call
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


_WS = " \t\r\n"
_MAX_HEAD = 512  # longest tag / name we wait for before calling the text malformed
_NAME_RE = re.compile(r"[^\s<>{}()\[\]\"'`,;]{1,256}")


def _valid_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def _partial_suffix(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


def _could_be(s: str, tags) -> bool:
    """`s` is a (proper) prefix of one of `tags`: more text may complete it."""
    return any(len(s) < len(t) and t.startswith(s) for t in tags)


def _strip_nl(v: str) -> str:
    if v.startswith("\r\n"):
        v = v[2:]
    elif v.startswith("\n"):
        v = v[1:]
    if v.endswith("\r\n"):
        v = v[:-2]
    elif v.endswith("\n"):
        v = v[:-1]
    return v


# ---------------------------------------------------------------------------------------------------------
# schema coercion

_INT_RE = re.compile(r"[-+]?\d+")
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    out: list[str] = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            for x in _schema_types(sub):
                if x not in out:
                    out.append(x)
    return out


def _coerce_one(s: str, t: str):
    """(ok, value) for the stripped text `s` read as JSON-schema type `t`."""
    if t == "integer":
        if _INT_RE.fullmatch(s):
            return True, int(s)
        if _NUM_RE.fullmatch(s):
            f = float(s)
            if math.isfinite(f) and f.is_integer():
                return True, int(f)
    elif t == "number":
        if _INT_RE.fullmatch(s):
            return True, int(s)
        if _NUM_RE.fullmatch(s):
            f = float(s)
            if math.isfinite(f):
                return True, f
    elif t == "boolean":
        if s.lower() in ("true", "false"):
            return True, s.lower() == "true"
    elif t == "null":
        if s.lower() in ("null", "none"):
            return True, None
    elif t in ("object", "array"):
        want = dict if t == "object" else list
        try:
            v = json.loads(s)
        except (ValueError, RecursionError):
            try:
                v = ast.literal_eval(s) if len(s) < 1_000_000 else None
            except Exception:  # noqa: BLE001 - any failure means "not this type"
                v = None
        if isinstance(v, want):
            try:
                json.dumps(v, allow_nan=False)  # only JSON-representable values
                return True, v
            except (TypeError, ValueError, RecursionError):
                pass
    return False, None


def coerce_value(raw: str, schema: Any):
    """The raw text of a parameter value read as its JSON-schema type; the string itself if that fails."""
    types = _schema_types(schema)
    s = raw.strip()
    for t in [t for t in types if t != "string"]:
        try:
            ok, v = _coerce_one(s, t)
        except Exception:  # noqa: BLE001
            ok = False
        if ok:
            return v
    return raw


# ---------------------------------------------------------------------------------------------------------
# incremental JSON object re-emitter (for the JSON formats)

_STR_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_CONT_RUN = re.compile(r'[^"\\{}\[\]<]+')
_ESC_SIMPLE = '"\\/bfnrt'
_HEX = set("0123456789abcdefABCDEF")
_SCALAR_END = ",}] \t\r\n"


class _JsonArgs:
    """Reads a JSON object's text (its ``{`` already consumed) piece by piece and re-emits it as fragments
    of valid JSON text: string values stream as they arrive, other values once complete. ``repair()`` is the
    suffix that closes what was emitted so far."""

    def __init__(self) -> None:
        self.state = "key_or_end"
        self.first = True
        self.done = False
        self.error = False
        self.raw: list[str] = []  # consumed text not yet reflected in the output
        self.key_raw: list[str] = []
        self.key_esc = False
        self.key = ""
        self.val: list[str] = []
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.esc_buf = ""

    def pending(self) -> str:
        return "".join(self.raw) + self.esc_buf

    def repair(self) -> str:
        if self.done:
            return ""
        return '"}' if self.state == "strval" else "}"

    def _prefix(self) -> str:
        p = ("" if self.first else ", ") + json.dumps(self.key, ensure_ascii=False) + ": "
        self.first = False
        return p

    def feed(self, s: str) -> tuple[str, int]:
        """Consume from `s`; return (output fragment, number of characters consumed)."""
        out: list[str] = []
        i, n = 0, len(s)
        while i < n and not self.done and not self.error:
            st = self.state
            c = s[i]
            if st == "strval":
                if self.esc_buf:
                    if len(self.esc_buf) == 1:
                        if c in _ESC_SIMPLE:
                            out.append("\\" + c)
                            self.esc_buf = ""
                        elif c == "u":
                            self.esc_buf = "\\u"
                        else:
                            self.error = True
                            break
                    else:
                        if c not in _HEX:
                            self.error = True
                            break
                        self.esc_buf += c
                        if len(self.esc_buf) == 6:
                            out.append(self.esc_buf)
                            self.esc_buf = ""
                    i += 1
                    continue
                m = _STR_RUN.match(s, i)
                if m:
                    out.append(m.group())
                    i = m.end()
                    continue
                if c == "\\":
                    self.esc_buf = "\\"
                elif c == '"':
                    out.append('"')
                    self.state = "after_value"
                else:  # a raw control character: escape it so the output stays valid JSON
                    out.append(json.dumps(c)[1:-1])
                i += 1
                continue
            if st == "key":
                m = _STR_RUN.match(s, i)
                if m and not self.key_esc:
                    self.key_raw.append(m.group())
                    self.raw.append(m.group())
                    i = m.end()
                    continue
                self.raw.append(c)
                i += 1
                if self.key_esc:
                    self.key_esc = False
                    self.key_raw.append(c)
                elif c == "\\":
                    self.key_esc = True
                    self.key_raw.append(c)
                elif c == '"':
                    try:
                        self.key = json.loads('"' + "".join(self.key_raw) + '"', strict=False)
                    except ValueError:
                        self.error = True
                        break
                    self.state = "colon"
                else:
                    self.key_raw.append(c)
                continue
            if st == "scalar":
                if c in _SCALAR_END:
                    try:
                        v = json.loads("".join(self.val))
                        text = json.dumps(v, allow_nan=False)
                    except (ValueError, OverflowError):
                        self.error = True
                        break
                    out.append(self._prefix() + text)
                    self.raw = []
                    self.state = "after_value"
                    continue  # the delimiter is read by after_value
                if len(self.val) > 400:
                    self.error = True
                    break
                self.val.append(c)
                self.raw.append(c)
                i += 1
                continue
            if st == "container":
                m = _CONT_RUN.match(s, i)
                if m and not self.esc:
                    self.val.append(m.group())
                    self.raw.append(m.group())
                    i = m.end()
                    continue
                self.val.append(c)
                self.raw.append(c)
                i += 1
                if self.in_str:
                    if self.esc:
                        self.esc = False
                    elif c == "\\":
                        self.esc = True
                    elif c == '"':
                        self.in_str = False
                elif c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        try:
                            v = json.loads("".join(self.val), strict=False)
                            text = json.dumps(v, ensure_ascii=False, allow_nan=False)
                        except (ValueError, RecursionError, OverflowError):
                            self.error = True
                            break
                        out.append(self._prefix() + text)
                        self.raw = []
                        self.val = []
                        self.state = "after_value"
                elif c == "<":  # never outside a JSON string: the model left the JSON
                    self.error = True
                    break
                continue
            # structural states
            if c in _WS:
                self.raw.append(c)
                i += 1
                continue
            if st in ("key_or_end", "key_start"):
                if c == '"':
                    self.state = "key"
                    self.key_raw = []
                    self.key_esc = False
                elif c == "}":  # (after a trailing comma too: lenient)
                    out.append("}")
                    self.done = True
                else:
                    self.error = True
                    break
            elif st == "colon":
                if c != ":":
                    self.error = True
                    break
                self.state = "value_start"
            elif st == "value_start":
                if c == '"':
                    out.append(self._prefix() + '"')
                    self.raw = []
                    self.state = "strval"
                    i += 1
                    continue
                if c in "{[":
                    self.val = [c]
                    self.depth = 1
                    self.in_str = self.esc = False
                    self.state = "container"
                elif c in "-0123456789tfn":
                    self.val = [c]
                    self.state = "scalar"
                else:
                    self.error = True
                    break
            elif st == "after_value":
                if c == ",":
                    self.state = "key_start"
                elif c == "}":
                    out.append("}")
                    self.done = True
                else:
                    self.error = True
                    break
            self.raw.append(c)
            i += 1
        if self.done:
            self.raw = []
        return "".join(out), i


def _json_value_end(s: str, st: list) -> int:
    """Incremental scan for the end of the JSON object/array starting at s[0]; `st` = [pos, depth, in_str,
    esc] persists between calls. Returns the index after its end, -1 if not complete yet, -2 if text that
    cannot be JSON (a '<' outside a string) comes first."""
    pos, depth, in_str, esc = st
    n = len(s)
    while pos < n:
        c = s[pos]
        pos += 1
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                st[:] = [pos, depth, in_str, esc]
                return pos
        elif c == "<":
            return -2
    st[:] = [pos, depth, in_str, esc]
    return -1


# ---------------------------------------------------------------------------------------------------------
# base


class _XmlCfg:
    """How the XML-ish formats write a call's parameters."""

    def __init__(self, match_open, value_close: str, call_close: str, alt_close: tuple[str, ...], after: str):
        self.match_open = match_open  # s -> (key, consumed) | _WAIT | None
        self.value_close = value_close
        self.call_close = call_close  # closes the call (consumed)
        self.alt_close = alt_close  # also end the call, left for the `after` state
        self.after = after


_WAIT = object()


class ToolParser:
    """Base class: the text state, emission helpers and the XML parameter loop. Subclasses set `markers`
    and implement ``_enter(marker)`` plus their ``_st_<state>`` handlers (each returns True when it made
    progress, False when it needs more text)."""

    markers: tuple[str, ...] = ()

    def __init__(self, tools: list[dict] | None = None):
        self._props: dict[str, dict] = {}
        for t in tools or []:
            try:
                fn = t.get("function", t)
                params = fn.get("parameters") or {}
                props = params.get("properties") or {}
                if isinstance(fn.get("name"), str) and isinstance(props, dict):
                    self._props[fn["name"]] = props
            except AttributeError:
                continue
        self._buf = ""
        self._state = "text"
        self._raw = ""  # held text of a call section not committed yet (content if it turns out malformed)
        self._holding = False
        self._content_parts: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._n_calls = 0
        self._cur: int | None = None  # index of the open call
        self._cur_name = ""
        self._js: _JsonArgs | None = None
        self._first_param = True
        self._after_call = False
        self._in_stray = False
        self._scan = 0
        self._xcfg: _XmlCfg | None = None
        self._xkey = ""
        self._xopen_raw = ""
        self._skip_end = ""
        self._skip_after = "text"
        self._finished = False

    # -- public ------------------------------------------------------------------------------------------
    @property
    def called(self) -> bool:
        return self._n_calls > 0

    def feed(self, text: str) -> ParseDelta:
        if self._finished or not text:
            return ParseDelta()
        self._buf += text
        self._safe_run(False)
        return self._take()

    def finish(self) -> ParseDelta:
        if self._finished:
            return ParseDelta()
        self._safe_run(True)
        self._finished = True
        return self._take()

    # -- machinery ---------------------------------------------------------------------------------------
    def _safe_run(self, final: bool) -> None:
        try:
            self._run(final)
        except Exception:  # noqa: BLE001 - a parser bug must not break generation: fall back to content
            if self._cur is not None:
                self._args(self._js.repair() if self._js is not None else "}")
                self._cur = None
            self._js = None
            self._content(self._raw + self._buf)
            self._raw, self._buf, self._holding = "", "", False
            self._goto("text")

    def _run(self, final: bool) -> None:
        while True:
            if getattr(self, "_st_" + self._state)(final):
                continue
            if not final or (self._state == "text" and not self._buf):
                return
            self._abort()

    def _abort(self) -> None:
        """The text ended inside a call section: close what is open; the rest becomes content."""
        if self._cur is not None:
            if self._js is not None:
                self._args(self._js.repair())
                self._content(self._js.pending())
            else:
                if self._state == "x_value":
                    self._content(self._xopen_raw)
                self._args("}")
            self._cur = None
            self._after_call = False
        self._js = None
        self._content(self._raw)
        self._raw, self._holding = "", False
        self._goto("text")

    def _take(self) -> ParseDelta:
        d = ParseDelta("".join(self._content_parts), self._deltas)
        self._content_parts, self._deltas = [], []
        return d

    def _goto(self, state: str) -> None:
        self._state = state
        self._scan = 0
        self._in_stray = False

    def _content(self, s: str) -> None:
        if s:
            self._content_parts.append(s)

    def _eat(self, k: int) -> None:
        """Consume k characters of the buffer (kept as held raw text while the section is uncommitted)."""
        if self._holding:
            self._raw += self._buf[:k]
        self._buf = self._buf[k:]

    def _hold(self, marker: str) -> None:
        self._holding = True
        self._raw += marker

    def _bail(self) -> bool:
        """An uncommitted call section is malformed: its held text is content; rescan the rest as text."""
        self._content(self._raw)
        self._raw, self._holding = "", False
        self._goto("text")
        return True

    def _start_call(self, name: str) -> None:
        self._raw, self._holding = "", False
        idx = self._n_calls
        self._n_calls += 1
        self._deltas.append(ToolCallDelta(index=idx, id=_new_id(), name=name))
        self._cur, self._cur_name, self._first_param = idx, name, True

    def _args(self, s: str) -> None:
        if not s or self._cur is None:
            return
        if self._deltas and self._deltas[-1].index == self._cur:
            self._deltas[-1].arguments += s
        else:
            self._deltas.append(ToolCallDelta(index=self._cur, arguments=s))

    def _end_call(self) -> None:
        self._cur = None
        self._js = None
        self._after_call = True

    def _enter(self, marker: str) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    # -- text ---------------------------------------------------------------------------------------------
    def _st_text(self, final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._after_call:  # whitespace between calls / after the last one is not content
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            self._after_call = False
        pos, mk = -1, ""
        for m in self.markers:
            i = buf.find(m)
            if i != -1 and (pos == -1 or i < pos):
                pos, mk = i, m
        if pos != -1:
            self._content(buf[:pos])
            self._buf = buf[pos + len(mk) :]
            self._raw = ""
            self._hold(mk)
            self._enter(mk)
            return True
        if final:
            self._content(buf)
            self._buf = ""
            return False
        keep = _partial_suffix(buf, self.markers)
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    # -- stray text inside a call section ----------------------------------------------------------------
    def _stray(self) -> bool:
        """Emit the non-structural text at the buffer start (up to the next '<') as content; whitespace
        next to tags is dropped."""
        buf = self._buf
        s = buf.lstrip()
        if s.startswith("<") or not self._in_stray:
            buf = s
        j = buf.find("<", 1)
        if j == -1:
            seg = buf.rstrip()
            self._content(seg)
            self._buf = buf[len(seg) :]
            self._in_stray = True
        else:
            self._content(buf[:j].rstrip())
            self._buf = buf[j:]
            self._in_stray = False
        return True

    def _skip_to(self, end_tag: str, after: str) -> None:
        """After a malformed committed call: content up to `end_tag` (consumed), then state `after`."""
        self._skip_end, self._skip_after = end_tag, after
        self._goto("skip")

    def _st_skip(self, final: bool) -> bool:
        buf = self._buf
        stops = (self._skip_end, *self.markers)
        pos, mk = -1, ""
        for m in stops:
            i = buf.find(m)
            if i != -1 and (pos == -1 or i < pos):
                pos, mk = i, m
        if pos != -1:
            self._content(buf[:pos])
            self._buf = buf[pos + len(mk) :] if mk == self._skip_end else buf[pos:]
            self._goto(self._skip_after if mk == self._skip_end else "text")
            return True
        if final:
            self._content(buf)
            self._buf = ""
            self._goto("text")
            return False
        keep = _partial_suffix(buf, stops)
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    # -- XML parameters -----------------------------------------------------------------------------------
    def _open_xml_call(self, name: str, cfg: _XmlCfg) -> None:
        self._start_call(name)
        self._args("{")
        self._xcfg = cfg
        self._goto("x_params")

    def _st_x_params(self, final: bool) -> bool:
        cfg = self._xcfg
        s = self._buf.lstrip()
        if not s:
            return False
        if s.startswith(cfg.call_close):
            self._buf = s[len(cfg.call_close) :]
            self._args("}")
            self._end_call()
            self._goto(cfg.after)
            return True
        for a in cfg.alt_close:
            if s.startswith(a):
                self._buf = s
                self._args("}")
                self._end_call()
                self._goto(cfg.after)
                return True
        r = cfg.match_open(s)
        if r is _WAIT:
            return False
        if r is not None:
            key, k = r
            self._xopen_raw = s[:k]
            self._buf = s[k:]
            self._xkey = key
            self._goto("x_value")
            return True
        if _could_be(s, (cfg.call_close, *cfg.alt_close)):
            return False
        return self._stray()

    def _st_x_value(self, final: bool) -> bool:
        tag = self._xcfg.value_close
        buf = self._buf
        i = buf.find(tag, self._scan)
        if i == -1:
            self._scan = max(0, len(buf) - len(tag) + 1)
            return False
        raw = _strip_nl(buf[:i])
        self._buf = buf[i + len(tag) :]
        schema = self._props.get(self._cur_name, {}).get(self._xkey)
        value = coerce_value(raw, schema)
        sep = "" if self._first_param else ", "
        self._first_param = False
        self._args(
            sep + json.dumps(self._xkey, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
        )
        self._goto("x_params")
        return True


def _tag_open(s: str, prefix: str, pattern: re.Pattern):
    """Match an opening tag `pattern` at the start of `s`, which should start with `prefix`: (key, length),
    _WAIT while it may still complete, None if it is not that tag."""
    if len(s) < len(prefix):
        return _WAIT if prefix.startswith(s) else None
    if not s.startswith(prefix):
        return None
    m = pattern.match(s)
    if m:
        key = next((g for g in m.groups() if g is not None), "")
        return key.strip(), m.end()
    if ">" not in s and len(s) < _MAX_HEAD:
        return _WAIT
    return None


# ---------------------------------------------------------------------------------------------------------
# MiniMax-M2


_MM_OPEN = "<minimax:tool_call>"
_MM_CLOSE = "</minimax:tool_call>"
# (no '<' or '>' inside a name: the tag ends at its first '>', whatever the split)
_MM_INVOKE = re.compile(
    r"""<invoke\s+name\s*=\s*(?:"([^"<>]{0,256})"|'([^'<>]{0,256})'|([^\s<>"']{1,256}))\s*>"""
)
_MM_PARAM = re.compile(
    r"""<parameter\s+name\s*=\s*(?:"([^"<>]{0,256})"|'([^'<>]{0,256})'|([^\s<>"']{1,256}))\s*>"""
)


class MiniMaxM2ToolParser(ToolParser):
    markers = (_MM_OPEN,)

    _cfg = _XmlCfg(
        lambda s: _tag_open(s, "<parameter", _MM_PARAM),
        "</parameter>",
        "</invoke>",
        (_MM_CLOSE, "<invoke"),
        "m_block",
    )

    def _enter(self, marker: str) -> None:
        self._goto("m_block")

    def _st_m_block(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        lead = len(self._buf) - len(s)
        if s.startswith(_MM_CLOSE):
            self._eat(lead + len(_MM_CLOSE))
            self._raw, self._holding = "", False  # an empty block is dropped
            self._after_call = True
            self._goto("text")
            return True
        r = _tag_open(s, "<invoke", _MM_INVOKE)
        if r is _WAIT:
            return False
        if r is not None and _valid_name(r[0]):
            self._buf = s[r[1] :]
            self._open_xml_call(r[0], self._cfg)
            return True
        if _could_be(s, (_MM_CLOSE,)):
            return False
        if self._holding:
            return self._bail()
        return self._stray()


# ---------------------------------------------------------------------------------------------------------
# Hermes / Qwen (JSON body, or Qwen3-Coder's XML body)


_TC_OPEN = "<tool_call>"
_TC_CLOSE = "</tool_call>"
_HERMES_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')
_QWEN_FUNC = re.compile(r"<function=([^<>\n]{0,256})>")
_QWEN_PARAM = re.compile(r"<parameter=([^<>\n]{0,256})>")


class HermesToolParser(ToolParser):
    markers = (_TC_OPEN,)

    _qcfg = _XmlCfg(
        lambda s: _tag_open(s, "<parameter=", _QWEN_PARAM),
        "</parameter>",
        "</function>",
        (_TC_CLOSE, _TC_OPEN),
        "h_end",
    )

    def _enter(self, marker: str) -> None:
        self._goto("h_body")

    def _st_h_body(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        lead = len(self._buf) - len(s)
        if s[0] == "{":
            self._eat(lead)
            self._jscan = [0, 0, False, False]
            self._goto("h_head")
            return True
        r = _tag_open(s, "<function=", _QWEN_FUNC)
        if r is _WAIT:
            return False
        if r is not None and _valid_name(r[0]):
            self._buf = s[r[1] :]
            self._open_xml_call(r[0], self._qcfg)
            return True
        return self._bail()

    def _st_h_head(self, final: bool) -> bool:
        buf = self._buf
        m = _HERMES_HEAD.match(buf)
        if m:
            try:
                name = json.loads('"' + m.group(1) + '"', strict=False)
            except ValueError:
                return self._bail()
            if not isinstance(name, str) or not name:
                return self._bail()
            self._buf = buf[m.end() :]
            self._start_call(name)
            self._js = _JsonArgs()
            self._args("{")
            self._goto("h_args")
            return True
        end = _json_value_end(buf, self._jscan)
        if end == -1:
            return False
        if end == -2:
            return self._bail()
        try:  # another key order or string arguments: the whole object at once
            obj = json.loads(buf[:end], strict=False)
            name = obj.get("name")
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args, strict=False) if args.strip() else {}
            if args is None:
                args = {}
            text = json.dumps(args, ensure_ascii=False, allow_nan=False)
            ok = isinstance(name, str) and name != "" and isinstance(args, dict)
        except (ValueError, AttributeError, RecursionError, TypeError, OverflowError):
            ok = False
        if not ok:
            return self._bail()
        self._buf = buf[end:]
        self._start_call(name)
        self._args(text)
        self._end_call()
        self._goto("h_end")
        return True

    def _st_h_args(self, final: bool) -> bool:
        js = self._js
        out, k = js.feed(self._buf)
        self._args(out)
        self._buf = self._buf[k:]
        if js.done:
            self._end_call()
            self._jscan = [0, 1, False, False]
            self._goto("h_outer")
            return True
        if js.error:
            self._args(js.repair())
            self._content(js.pending())
            self._end_call()
            self._skip_to(_TC_CLOSE, "text")
            return True
        return False

    def _st_h_outer(self, final: bool) -> bool:
        """The rest of the outer {"name":..., "arguments": {...}} object (normally just '}')."""
        buf = self._buf
        if not buf:
            return False
        end = _json_value_end(buf, self._jscan)
        if end == -1:
            self._buf = ""
            self._jscan[0] = 0
            return False
        if end == -2:  # the object was never closed: take what follows as is
            self._goto("h_end")
            return True
        self._buf = buf[end:]
        self._goto("h_end")
        return True

    def _st_h_end(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        if s.startswith(_TC_CLOSE):
            self._buf = s[len(_TC_CLOSE) :]
        elif _could_be(s, (_TC_CLOSE,)):
            return False
        self._goto("text")
        return True

    def _abort(self) -> None:
        if self._state in ("h_outer", "h_end"):
            self._goto("text")
            return
        super()._abort()


# ---------------------------------------------------------------------------------------------------------
# DeepSeek-V3 / R1 / V3.1


_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"
_DS_V3_REST = re.compile(r"[ \t]*([^\s`{<]+)[ \t]*\r?\n?\s*(?:```[A-Za-z]*)?\s*\{")
_DS_V3_PARTIAL = re.compile(r"[ \t]*[^\s`{<]*(?:[ \t]*\r?\n?\s*(?:`{1,3}[A-Za-z]*)?\s*)?")
_DS_V31_REST = re.compile(r"\s*(?:```[A-Za-z]*)?\s*\{")
_DS_V31_PARTIAL = re.compile(r"\s*(?:`{1,3}[A-Za-z]*\s*)?")


class _JsonCallParser(ToolParser):
    """The part DeepSeek-V3's and Kimi-K2's formats share: a call's JSON arguments streamed as generated,
    then its end marker (`_call_end`, a ``` fence before it where `_fenced`), then the next call of the
    block (state `_block`) or text for a bare call."""

    _call_end = ""
    _block = "text"
    _fenced = False
    _bare = False

    def _open_json_call(self, name: str) -> None:
        self._start_call(name)
        self._js = _JsonArgs()
        self._args("{")
        self._goto("j_args")

    def _after_call_state(self) -> str:
        return "text" if self._bare else self._block

    def _st_j_args(self, final: bool) -> bool:
        js = self._js
        out, k = js.feed(self._buf)
        self._args(out)
        self._buf = self._buf[k:]
        if js.done:
            self._end_call()
            self._goto("j_tail")
            return True
        if js.error:
            self._args(js.repair())
            self._content(js.pending())
            self._end_call()
            self._skip_to(self._call_end, self._after_call_state())
            return True
        return False

    def _st_j_tail(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if self._fenced:
            if s.startswith("```"):
                s = s[3:].lstrip()
            elif _could_be(s, ("```",)) and not final:
                return False
        if not s:
            return False
        if s.startswith(self._call_end):
            self._buf = s[len(self._call_end) :]
        elif _could_be(s, (self._call_end,)):
            return False
        else:
            self._buf = s
        self._goto(self._after_call_state())
        return True

    def _abort(self) -> None:
        if self._state == "j_tail":
            self._buf = ""
            self._goto("text")
            return
        super()._abort()


class DeepSeekV3ToolParser(_JsonCallParser):
    markers = (_DS_CALLS_BEGIN, _DS_CALL_BEGIN)
    _call_end, _block, _fenced = _DS_CALL_END, "d_block", True

    def _enter(self, marker: str) -> None:
        self._bare = marker == _DS_CALL_BEGIN
        self._goto("d_block" if marker == _DS_CALLS_BEGIN else "d_head")

    def _st_d_block(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        lead = len(self._buf) - len(s)
        if s.startswith(_DS_CALL_BEGIN):
            if not self._holding:
                self._buf = s[len(_DS_CALL_BEGIN) :]
                self._hold(_DS_CALL_BEGIN)
            else:
                self._eat(lead + len(_DS_CALL_BEGIN))
            self._goto("d_head")
            return True
        if s.startswith(_DS_CALLS_END):
            self._buf = s[len(_DS_CALLS_END) :]
            self._raw, self._holding = "", False
            self._after_call = True
            self._goto("text")
            return True
        if _could_be(s, (_DS_CALL_BEGIN, _DS_CALLS_END)):
            return False
        if self._holding:
            return self._bail()
        return self._stray()

    def _st_d_head(self, final: bool) -> bool:
        buf = self._buf
        i = buf.find(_DS_SEP)
        if i == -1:
            if len(buf) > _MAX_HEAD or "<｜tool▁call" in buf:
                return self._bail()
            return False
        head = buf[:i].strip()
        rest_at = i + len(_DS_SEP)
        rest = buf[rest_at:]
        name = None
        m = _DS_V31_REST.match(rest)
        if head == "function" and not m:  # V3 / R1: the name follows the separator
            m = _DS_V3_REST.match(rest)
            if m:
                name = m.group(1)
            elif _DS_V3_PARTIAL.fullmatch(rest) and len(rest) < _MAX_HEAD:
                return False
            else:
                return self._bail()
        elif m:  # V3.1: the name precedes it
            name = head
        elif _DS_V31_PARTIAL.fullmatch(rest) and len(rest) < _MAX_HEAD:
            return False
        else:
            return self._bail()
        if not _valid_name(name):
            return self._bail()
        self._buf = rest[m.end() :]
        self._open_json_call(name)
        return True


# ---------------------------------------------------------------------------------------------------------
# GLM-4.5 / 4.6 / 4.7


_GLM_ARG = re.compile(r"<arg_key>([^<]{0,256})</arg_key>\s*<arg_value>")


def _glm_open(s: str):
    p = "<arg_key>"
    if len(s) < len(p):
        return _WAIT if p.startswith(s) else None
    if not s.startswith(p):
        return None
    m = _GLM_ARG.match(s)
    if m:
        return m.group(1).strip(), m.end()
    j = s.find("<", len(p))
    if j == -1:
        return _WAIT if len(s) < _MAX_HEAD else None
    tail = s[j:]
    if _could_be(tail, ("</arg_key>",)):
        return _WAIT
    if not tail.startswith("</arg_key>"):
        return None
    rest = tail[len("</arg_key>") :].lstrip()
    return _WAIT if not rest or _could_be(rest, ("<arg_value>",)) else None


class Glm4MoeToolParser(ToolParser):
    markers = (_TC_OPEN,)

    _cfg = _XmlCfg(_glm_open, "</arg_value>", _TC_CLOSE, (_TC_OPEN,), "text")

    def _enter(self, marker: str) -> None:
        self._goto("g_name")

    def _st_g_name(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        m = re.search(r"[\n<]", s)
        if not m:
            if len(s) > 256:
                return self._bail()
            return False
        name = s[: m.start()].strip()
        if not _valid_name(name):
            return self._bail()
        self._buf = s[m.start() :]
        self._open_xml_call(name, self._cfg)
        return True


# ---------------------------------------------------------------------------------------------------------
# Kimi-K2

_KM_SECTION = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")  # both spellings occur
_KM_SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
_KM_CALL = "<|tool_call_begin|>"
_KM_ARGS = "<|tool_call_argument_begin|>"
_KM_CALL_END = "<|tool_call_end|>"
_KM_HEAD = re.compile(r"(?:functions\.)?([^\s:<>|]{1,256}?)(?::(\d{1,9}))?")


class KimiK2ToolParser(_JsonCallParser):
    """``<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{...}
    <|tool_call_end|>...<|tool_calls_section_end|>``: the head is the call's id (Kimi's templates render it
    back as the id of the call and of its result), the name is between ``functions.`` and ``:N``."""

    markers = (*_KM_SECTION, _KM_CALL)
    _call_end, _block = _KM_CALL_END, "k_block"

    def _enter(self, marker: str) -> None:
        self._bare = marker == _KM_CALL
        self._goto("k_head" if self._bare else "k_block")

    def _st_k_block(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not s:
            return False
        lead = len(self._buf) - len(s)
        if s.startswith(_KM_CALL):
            if not self._holding:
                self._buf = s[len(_KM_CALL) :]
                self._hold(_KM_CALL)
            else:
                self._eat(lead + len(_KM_CALL))
            self._goto("k_head")
            return True
        for end in _KM_SECTION_END:
            if s.startswith(end):
                self._buf = s[len(end) :]
                self._raw, self._holding = "", False
                self._after_call = True
                self._goto("text")
                return True
        if _could_be(s, (_KM_CALL, *_KM_SECTION_END)):
            return False
        if self._holding:
            return self._bail()
        return self._stray()

    def _st_k_head(self, final: bool) -> bool:
        buf = self._buf
        i = buf.find(_KM_ARGS)
        if i == -1:
            p = buf.find("<|")
            if len(buf) > _MAX_HEAD or (p != -1 and not _could_be(buf[p:], (_KM_ARGS,))):
                return self._bail()  # another marker, or no head this long: not a call
            return False
        head = buf[:i].strip()
        m = _KM_HEAD.fullmatch(head)
        rest = buf[i + len(_KM_ARGS) :]
        j = len(rest) - len(rest.lstrip())
        if not rest[j:]:
            return False  # the arguments' "{" not here yet
        if not m or not _valid_name(m.group(1)) or not rest[j:].startswith("{"):
            return self._bail()
        self._buf = rest[j + 1 :]
        self._open_json_call(m.group(1))
        if m.group(2) is not None and head.startswith("functions."):
            self._deltas[-1].id = head  # Kimi's own id: its template renders the call and result by it
        return True


# ---------------------------------------------------------------------------------------------------------

PARSERS: dict[str, type[ToolParser]] = {
    "minimax_m2": MiniMaxM2ToolParser,
    "hermes": HermesToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "glm4_moe": Glm4MoeToolParser,
    "kimi_k2": KimiK2ToolParser,
}

_FAMILY_FORMAT = {
    "minimax_m2": "minimax_m2",
    "qwen3_moe": "hermes",
    "qwen2_moe": "hermes",
    "mixtral": "hermes",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "kimi_k2",
    "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe",
}


def parser_for_family(family: str) -> str | None:
    """The tool-call format of a model_type (None: no parser here; gpt_oss's harmony is handled elsewhere)."""
    return _FAMILY_FORMAT.get(family)


def parse_whole(parser_cls: type[ToolParser], text: str, tools: list[dict] | None = None):
    """(content, [{"id", "type": "function", "function": {"name", "arguments"}}]) of a whole output."""
    p = parser_cls(tools)
    deltas = [p.feed(text), p.finish()]
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            c = calls.setdefault(
                tc.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
            )
            if tc.id is not None:
                c["id"] = tc.id
            if tc.name is not None:
                c["function"]["name"] = tc.name
            c["function"]["arguments"] += tc.arguments
    return content, [calls[i] for i in sorted(calls)]
