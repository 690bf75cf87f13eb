"""OpenAI's "harmony" chat format (gpt-oss models), through the ``openai-harmony`` library.

Nothing here writes the format by hand: prompts are rendered with harmony's
``render_conversation_for_completion`` and generated tokens are parsed with its ``StreamableParser``.

- :func:`render_prompt` turns chat-API messages (``system|developer|user|assistant|tool``, with
  ``reasoning_content``, ``tool_calls``, ``tool_call_id``/``name``) and OpenAI-shaped ``tools`` into prompt
  token ids for the assistant's next turn.
- :class:`HarmonyStream` parses generated token ids one at a time: the ``analysis`` channel is reasoning, the
  ``final`` channel (and commentary without a recipient, i.e. preambles) is content, and commentary messages
  addressed to ``functions.NAME`` are tool calls whose JSON arguments stream as they are generated.

The vocabulary. Harmony's GPT-OSS encoding is built on tiktoken's ``o200k_base`` vocabulary, which the
library downloads at run time unless ``TIKTOKEN_ENCODINGS_BASE`` names a folder holding
``o200k_base.tiktoken``. To work offline, when that variable is unset and the ``quicktok-v1`` package (PyPI)
is installed, the vocabulary is rebuilt from the copy that package ships, checked against the SHA-256 that
harmony itself expects, written once to ``$EMOE_TIKTOKEN_DIR`` (default ``~/.cache/emoe/tiktoken``) and the
variable pointed at it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emoe.tool_parsers import ToolCallDelta

__all__ = [
    "HarmonyDelta",
    "HarmonyStream",
    "harmony_available",
    "harmony_unavailable_reason",
    "load_encoding",
    "render_prompt",
]

O200K_FILE = "o200k_base.tiktoken"
# the hash harmony (and tiktoken) check the downloaded o200k_base.tiktoken against
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_ENV_BASE = "TIKTOKEN_ENCODINGS_BASE"


@dataclass
class HarmonyDelta:
    reasoning: str = ""  # analysis-channel text
    content: str = ""  # final-channel text (and commentary preambles)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: HarmonyDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


# --------------------------------------------------------------------------------------------- vocabulary


def _quicktok_vocab_path() -> Path | None:
    """The o200k vocabulary file the quicktok-v1 wheel ships, found without importing the package."""
    try:
        spec = importlib.util.find_spec("quicktok")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "o200k.vocab"
        if p.is_file():
            return p
    return None


def _tiktoken_text_from_quicktok(path: Path) -> bytes:
    """quicktok's ``o200k.vocab``: u32 count, then per token u16 length, the bytes, u32 rank (little endian).
    Returns the same vocabulary as a ``.tiktoken`` file: ``base64(bytes) rank`` per line, by rank."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    off, entries = 4, []
    while off < len(data):
        (n,) = struct.unpack_from("<H", data, off)
        off += 2
        tok = data[off : off + n]
        off += n
        (rank,) = struct.unpack_from("<I", data, off)
        off += 4
        entries.append((rank, tok))
    if len(entries) != count:
        raise ValueError(f"{path}: {len(entries)} tokens, header says {count}")
    entries.sort()
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in entries)


def _cache_dirs() -> list[Path]:
    if os.environ.get("EMOE_TIKTOKEN_DIR"):
        return [Path(os.environ["EMOE_TIKTOKEN_DIR"])]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [base / "emoe" / "tiktoken", Path(tempfile.gettempdir()) / "emoe-tiktoken"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _provide_vocab() -> str | None:
    """Point TIKTOKEN_ENCODINGS_BASE at a local, verified o200k_base.tiktoken when possible.
    Returns the folder used, or None (then harmony falls back to its own download + cache)."""
    if os.environ.get(_ENV_BASE):
        return os.environ[_ENV_BASE]  # the operator's choice wins
    dirs = _cache_dirs()
    for d in dirs:  # an earlier run's copy
        f = d / O200K_FILE
        if f.is_file() and _sha256(f) == O200K_SHA256:
            os.environ[_ENV_BASE] = str(d)
            return str(d)
    src = _quicktok_vocab_path()
    if src is None:
        return None
    text = _tiktoken_text_from_quicktok(src)
    if hashlib.sha256(text).hexdigest() != O200K_SHA256:
        raise ValueError(f"{src} does not rebuild o200k_base.tiktoken (SHA-256 mismatch)")
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".o200k.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(text)
            os.replace(tmp, d / O200K_FILE)
        except OSError:
            continue
        os.environ[_ENV_BASE] = str(d)
        return str(d)
    return None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str]:
    """(encoding or None, reason it is unavailable)."""
    try:
        import openai_harmony as oh
    except Exception as e:  # noqa: BLE001
        return None, f"the openai-harmony package is not importable ({e}); pip install openai-harmony"
    try:
        _provide_vocab()
    except Exception as e:  # noqa: BLE001 - fall back to harmony's own loading
        provide_err = f"; rebuilding it from quicktok-v1 failed: {e}"
    else:
        provide_err = ""
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS), ""
    except Exception as e:  # noqa: BLE001
        return None, (
            f"openai-harmony could not load the GPT-OSS encoding ({e}): it needs the o200k_base vocabulary; "
            f"set {_ENV_BASE} to a folder with {O200K_FILE}, or pip install quicktok-v1 (which ships it)"
            f"{provide_err}"
        )


def harmony_available() -> bool:
    """Whether openai-harmony and its GPT-OSS encoding (with the o200k vocabulary) load here."""
    return _load()[0] is not None


def harmony_unavailable_reason() -> str:
    """Why :func:`harmony_available` is False ("" when it is True)."""
    return _load()[1]


def load_encoding():
    """harmony's GPT-OSS ``HarmonyEncoding``; raises RuntimeError naming the missing piece."""
    enc, why = _load()
    if enc is None:
        raise RuntimeError(why)
    return enc


# ------------------------------------------------------------------------------------------------ prompts


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(
            p.get("text", "") if isinstance(p, dict) else str(p)
            for p in content
            if not isinstance(p, dict) or p.get("type", "text") == "text"
        )
    return str(content)


def _args_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


_EFFORTS = {"low": "LOW", "medium": "MEDIUM", "high": "HIGH"}


def render_prompt(
    messages: list[dict], tools: list[dict] | None = None, reasoning_effort: str = "medium"
) -> list[int]:
    """Prompt token ids for the assistant's next message (harmony's render_conversation_for_completion).

    Leading system/developer messages become the harmony developer message's instructions (the harmony system
    message holds the model identity, reasoning effort and channels, as gpt-oss's chat template does); later
    ones become developer messages. Reasoning of earlier, finished turns is dropped by harmony itself.
    """
    import openai_harmony as oh

    enc = load_encoding()
    effort = _EFFORTS.get(str(reasoning_effort or "medium").lower())
    if effort is None:
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")

    system = oh.SystemContent.new().with_reasoning_effort(getattr(oh.ReasoningEffort, effort))
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    i = 0
    instructions = []
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        instructions.append(_text(messages[i].get("content")))
        i += 1
    dev = oh.DeveloperContent.new()
    if any(instructions):
        dev = dev.with_instructions("\n\n".join(s for s in instructions if s))
    if tools:
        descs = []
        for t in tools:
            fn = t.get("function", t) if isinstance(t, dict) else {}
            if not fn.get("name"):
                continue
            descs.append(
                oh.ToolDescription.new(fn["name"], fn.get("description") or "", fn.get("parameters"))
            )
        if descs:
            dev = dev.with_function_tools(descs)
    if dev.instructions or dev.tools:
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))

    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results without "name"
    for m in messages[i:]:
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(
                oh.Message.from_role_and_content(
                    oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(_text(m.get("content")))
                )
            )
        elif role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, _text(m.get("content"))))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if reasoning:
                out.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning).with_channel("analysis")
                )
            calls = m.get("tool_calls") or []
            content = _text(m.get("content"))
            if content:  # with tool calls it was a preamble on the commentary channel
                out.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel(
                        "commentary" if calls else "final"
                    )
                )
            for c in calls:
                fn = c.get("function", {})
                name = fn.get("name", "")
                if c.get("id"):
                    call_names[c["id"]] = name
                out.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, _args_text(fn.get("arguments")))
                    .with_channel("commentary")
                    .with_recipient(f"functions.{name}")
                    .with_content_type("<|constrain|>json")
                )
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id") or "", "")
            if not name:
                raise ValueError("a tool message needs a name or the tool_call_id of an earlier call")
            out.append(
                oh.Message.from_author_and_content(
                    oh.Author.new(oh.Role.TOOL, f"functions.{name}"), _text(m.get("content"))
                )
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise ValueError(f"unknown message role {role!r}")

    return list(enc.render_conversation_for_completion(oh.Conversation.from_messages(out), oh.Role.ASSISTANT))


# ------------------------------------------------------------------------------------------------ parsing


class HarmonyStream:
    """Parses generated token ids incrementally (harmony's StreamableParser): analysis channel -> reasoning,
    final channel -> content, commentary messages addressed to functions.NAME -> tool calls.

    A call's first delta carries its id ("call_" + 24 hex) and name, as soon as the message header is complete;
    later deltas carry fragments of the arguments' JSON text as generated (``{}`` if the call had none).
    Messages to other recipients (harmony's built-in browser/python tools) are not surfaced. Malformed
    output never raises: the parser runs non-strict and a token it rejects is dropped.
    """

    def __init__(self, tools: list[dict] | None = None):
        import openai_harmony as oh

        self._enc = load_encoding()
        self._parser = oh.StreamableParser(self._enc, oh.Role.ASSISTANT, strict=False)
        self.tools = tools
        self.stop_token_ids: list[int] = list(self._enc.stop_tokens_for_assistant_actions())
        special = self._enc.encode("<|message|><|end|><|call|><|return|>", allowed_special="all")
        self._message_tok = special[0]
        self._end_toks = set(special[1:])
        self.called = False
        self._n_calls = 0
        self._call: ToolCallDelta | None = None  # the call now streaming
        self._call_has_args = False

    def _route(self, text: str, channel: str | None, recipient: str | None, d: HarmonyDelta) -> None:
        if not text:
            return
        if recipient and recipient.startswith("functions."):
            self._open_call(recipient, d)
            self._call_has_args = True
            d.tool_calls.append(ToolCallDelta(index=self._call.index, arguments=text))
        elif recipient and recipient != "assistant":
            return  # a built-in tool's input
        elif channel == "analysis":
            d.reasoning += text
        else:
            d.content += text

    def _open_call(self, recipient: str, d: HarmonyDelta) -> None:
        if self._call is not None:
            return
        self._call = ToolCallDelta(
            index=self._n_calls, id="call_" + secrets.token_hex(12), name=recipient[len("functions.") :]
        )
        self._n_calls += 1
        self._call_has_args = False
        self.called = True
        d.tool_calls.append(self._call)

    def _close_call(self, d: HarmonyDelta) -> None:
        if self._call is not None and not self._call_has_args:
            d.tool_calls.append(ToolCallDelta(index=self._call.index, arguments="{}"))
        self._call = None
        self._call_has_args = False

    def feed_token(self, token_id: int) -> HarmonyDelta:
        d = HarmonyDelta()
        p = self._parser
        try:
            p.process(int(token_id))
        except Exception:  # noqa: BLE001 - a token the parser rejects
            return d
        channel, recipient = p.current_channel, p.current_recipient
        self._route(p.last_content_delta or "", channel, recipient, d)
        if token_id == self._message_tok and recipient and recipient.startswith("functions."):
            self._open_call(recipient, d)  # the name as soon as the header is complete
        if token_id in self._end_toks:
            self._close_call(d)
        return d

    def feed_tokens(self, token_ids) -> HarmonyDelta:
        d = HarmonyDelta()
        for t in token_ids:
            d.extend(self.feed_token(t))
        return d

    def finish(self) -> HarmonyDelta:
        d = HarmonyDelta()
        p = self._parser
        channel, recipient = p.current_channel, p.current_recipient
        try:
            p.process_eos()
        except Exception:  # noqa: BLE001
            pass
        else:
            self._route(p.last_content_delta or "", channel, recipient, d)
        self._close_call(d)
        return d
