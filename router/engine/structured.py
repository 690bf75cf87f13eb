"""Structured outputs: a request's `GrammarSpec` compiled by xgrammar into a token-level grammar, and one
matcher per sequence whose bitmask the batched sampler applies.

xgrammar is the grammar engine vLLM and SGLang use: JSON schema, regex, EBNF and Lark compile to one
pushdown automaton over the model's tokenizer, with a per-token mask computed in C++ (a few microseconds a
step) and its own cache of compiled grammars.

Compilation runs in a small thread pool, never on the engine loop, bounded by `timeout_s`: a schema or
regex that takes longer is an `InvalidRequest` naming the field (and remembered, so sending it again fails
at once instead of tying up another thread); compiled grammars are kept in an LRU of `cache_size`. A
grammar that admits no text at all (an unsatisfiable regex) is refused when compiled, not left to stall a
sequence whose every token is masked.

JSON is generated compact (`{"a": 1, "b": [2, 3]}`: no free whitespace between tokens): a grammar that
allows any whitespace lets a model loop on spaces and newlines until max_tokens, the failure vLLM's
`disable_any_whitespace` option exists for. A schema is read in xgrammar's strict mode (no properties or
items beyond those it lists, unless it says otherwise); `json_object` is any JSON object.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from emoe.api import GrammarSpec, InvalidRequest

_CPP_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class Grammars:
    """Compiles `GrammarSpec`s for one model's tokenizer (`tokenizer_path` holds tokenizer.json); the
    token bitmask covers `vocab_size` logits, `stop_token_ids` end a completed grammar."""

    def __init__(
        self,
        tokenizer_path: str | Path,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        timeout_s: float = 10.0,
        cache_size: int = 256,
        threads: int = 2,
    ):
        self.path, self.vocab_size, self.stop_ids = Path(tokenizer_path), vocab_size, list(stop_token_ids)
        self.timeout_s, self.cache_size = timeout_s, cache_size
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()  # spec -> CompiledGrammar | error text
        self._pending: dict[GrammarSpec, asyncio.Future] = {}  # compilations under way
        self.compiled = 0  # compilations run (cache misses)
        self.timeouts = 0

    async def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher for `spec` (compiled or from the cache); raises InvalidRequest(spec.field)."""
        compiled = await self.compile(spec)
        return Matcher(compiled, self.vocab_size)

    async def compile(self, spec: GrammarSpec):
        key = _key(spec)
        hit = self._cache.get(key)
        if hit is None:
            task = self._pending.get(key)
            if task is None:  # one compilation per grammar, however many requests wait for it
                task = self._pending[key] = asyncio.ensure_future(self._load(key))
            hit = await asyncio.shield(task)
        else:
            self._cache.move_to_end(key)
        if isinstance(hit, str):
            raise InvalidRequest(spec.field, f"{spec.kind}: {hit}")
        return hit

    async def _load(self, key: GrammarSpec):
        """The compiled grammar, or the error text, remembered in the cache."""
        loop = asyncio.get_running_loop()
        try:
            # the tokenizer's vocabulary is read once, on first use, outside the compile time limit
            await loop.run_in_executor(self._pool, self._get_compiler)
            fut = loop.run_in_executor(self._pool, self._compile, key)
            hit = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            self.timeouts += 1
            hit = f"took longer than {self.timeout_s:g} s to compile; simplify it"
        except InvalidRequest as exc:
            hit = str(exc).removeprefix(f"{exc.field}: ")
        finally:
            self._pending.pop(key, None)
        self._remember(key, hit)
        return hit

    def _remember(self, key: GrammarSpec, value: Any) -> None:
        self._cache[key] = value
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ---- in a worker thread ------------------------------------------------------------------------
    def _compile(self, spec: GrammarSpec):
        import xgrammar as xgr

        compiler = self._get_compiler()
        self.compiled += 1
        try:
            if spec.kind == "json":
                try:
                    schema = json.loads(spec.value)
                except ValueError as exc:
                    raise InvalidRequest(spec.field, f"not valid JSON: {exc}") from None
                if not isinstance(schema, dict | bool):
                    raise InvalidRequest(spec.field, "a JSON schema is an object")
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            elif spec.kind == "json_object":
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.value)
            elif spec.kind == "tool_call":
                from emoe.tool_grammar import tool_call_grammar

                call = json.loads(spec.value)
                grammar = tool_call_grammar(call["format"], call["tools"], call.get("first_index", 0))
                compiled = compiler.compile_grammar(grammar)
            elif spec.kind == "choice":
                rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices)
                compiled = compiler.compile_grammar(f"root ::= {rule}")
            else:
                compiled = compiler.compile_grammar(spec.value)
        except InvalidRequest:
            raise
        except (RuntimeError, ValueError, xgr.InvalidJSONError) as exc:
            raise InvalidRequest(spec.field, _cpp_message(exc)) from None
        if not Matcher(compiled, self.vocab_size).admits_anything():
            raise InvalidRequest(spec.field, "no text matches it")
        return compiled

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast(tokenizer_file=str(self.path / "tokenizer.json"))
                info = xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Matcher:
    """One sequence's position in its grammar: `fill` writes the allowed next tokens into a bitmask row,
    `accept` advances by the sampled token (False if the grammar does not allow it)."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(int(token)))

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def admits_anything(self) -> bool:
        """Whether some token (a stop token included) may come first."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._m.fill_next_token_bitmask(bitmask)
        return bool((bitmask != 0).any())


def apply_bitmask(
    x: torch.Tensor, rows: list[int], matchers: list[Matcher], unmasked: torch.Tensor | None = None
) -> None:
    """Masks (to -inf) the tokens each matcher's grammar forbids next, in rows `rows` of x [B, V]. A row
    left with no token at all (the grammar allows only what min_tokens or logit_bias masked, e.g. a stop
    token once the JSON is complete) takes its `unmasked` logits under the grammar's mask instead: the
    grammar wins over min_tokens, as a sequence must be able to end."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(x.shape[0], x.shape[1])
    for r, m in zip(rows, matchers, strict=True):
        m.fill(bitmask, r)
    xgr.apply_token_bitmask_inplace(x, bitmask, indices=rows)
    if unmasked is None:
        return
    dead = torch.isneginf(x[rows]).all(dim=1).tolist()
    stuck = [r for r, d in zip(rows, dead, strict=True) if d]
    if stuck:
        x[stuck] = unmasked[stuck].to(x.dtype)
        xgr.apply_token_bitmask_inplace(x, bitmask, indices=stuck)


def _key(spec: GrammarSpec) -> GrammarSpec:
    return GrammarSpec(spec.kind, spec.value, spec.choices, field="")


def _cpp_message(exc: BaseException) -> str:
    """xgrammar's C++ error text without its timestamp and source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _CPP_PREFIX.sub("", text)[:300]
