"""AsyncEngine: the serving engine of a router replica. Continuous batching over a paged KV cache.

Stream contract of `generate(request)`: an async iterator of `GenerateChunk`s, one per engine step that
produced a token; `text` holds only complete characters (a split multi-byte character waits for its last
token) and never any part of a matched stop string; the last chunk has `finish_reason` ("stop" for an eos
/ stop token / stop string, "length" for max_tokens or the context limit); usage: `GenerateRequest.usage`.
Abandoning the iterator (client gone, `cancel`) frees the request's KV blocks at once.

The loop, per step: 1. schedule (scheduler.py); 2. one forward over every scheduled chunk, flattened;
3. sample where a sequence's known tokens are all computed; 4. detokenize, check stops, emit chunks,
free finished sequences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from emoe.api import (
    GenerateChunk,
    GenerateRequest,
    InvalidRequest,
    Overloaded,
    TokenLogprob,
    UnknownRequest,
)
from emoe.metrics import Histogram
from emoe.spec import ModelSpec
from emoe.tokenizer import IncrementalDetokenizer, Tokenizer
from router.dispatch import Dispatcher
from router.engine.sampling import SequenceSampling, prompt_logprobs, sample, stop_token_set
from router.engine.scheduler import BlockManager, Scheduler, Sequence, Status
from router.engine.structured import Grammars, Matcher
from router.model import KVPool, PagedDecode, PagedSequenceCache, RouterModel, Segment, Segments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    kv_blocks: int = 2048
    block_size: int = 16
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    max_queue: int = 256  # waiting requests beyond this are refused (Overloaded)
    max_context: int = 4096
    # 2 = ping-pong: a step's sequences run as two micro-batches whose layers interleave, so one's attention
    # runs while the other's tokens are at the (remote) experts. Each expert group then reads its weights
    # twice per step, so it pays only where the experts are elsewhere and the router's work is comparable.
    micro_batches: int = 1
    grammar_timeout_s: float = 10.0  # a structured-output grammar that compiles longer is a 400
    # automatic prefix caching: a prompt's full blocks already in the pool are reused, not recomputed
    prefix_caching: bool = True


@dataclass
class RequestState:
    request: GenerateRequest
    sampling: SequenceSampling
    queue: asyncio.Queue
    detok: IncrementalDetokenizer | None
    stops: frozenset[int]
    pending_text: str = ""  # decoded but held back: it may be the start of a stop string
    # sampling.prompt_logprobs: entry p for prompt token p (None for the first), filled as prefill runs
    prompt_logprobs: list[TokenLogprob | None] | None = None
    done: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    arrived_at: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(
        self,
        spec: ModelSpec,
        model: RouterModel,
        dispatcher: Dispatcher,
        config: EngineConfig = EngineConfig(),
        tokenizer: Tokenizer | None = None,
    ):
        self.spec, self.model, self.dispatcher, self.config = spec, model, dispatcher, config
        self.tokenizer = tokenizer
        self.pool = KVPool(spec.num_layers, config.kv_blocks, config.block_size)
        self.scheduler = Scheduler(
            BlockManager(config.kv_blocks, config.block_size, prefix_caching=config.prefix_caching),
            config.max_batch_tokens,
            config.max_num_seqs,
        )
        self.seqs: dict[str, Sequence] = {}
        self.in_flight: set[Sequence] = set()
        self.steps = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.finished_by_reason: dict[str, int] = {}  # "stop" / "length"
        self.prompt_tokens = 0  # admitted prompts' tokens
        self.ttft, self.tpot, self.e2e = Histogram(), Histogram(), Histogram()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.on_step = None  # optional callable(seconds, chunks) after each step (benchmarks)
        self._grammars: Grammars | None = None

    # ---- public --------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        grammar = await self._grammar(request) if request.sampling.structured is not None else None
        seq = self._admit(request, grammar)
        state: RequestState = seq.state
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            if not state.done:
                self._abort(seq)

    async def cancel(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise UnknownRequest(request_id)
        self._abort(seq)

    def stats(self) -> dict:
        bm = self.scheduler.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bm.num_used,
            "kv_blocks_total": bm.num_blocks,
            "kv_usage": bm.num_used / bm.num_blocks,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "preemptions": self.scheduler.num_preemptions,
            **bm.stats(),
            "requests_finished": self.requests_finished,
            "finished_by_reason": dict(self.finished_by_reason),
            "prompt_tokens": self.prompt_tokens,
            "ttft_s": self.ttft.to_dict(),
            "tpot_s": self.tpot.to_dict(),
            "e2e_s": self.e2e.to_dict(),
        }

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidRequest("structured_outputs", "this engine has no tokenizer to compile grammars")
            self._grammars = Grammars(
                self.tokenizer.path,
                self.spec.vocab_size,
                tuple(self.spec.eos_token_ids),
                timeout_s=self.config.grammar_timeout_s,
            )
        return self._grammars

    async def _grammar(self, request: GenerateRequest) -> Matcher:
        """The request's grammar matcher (compiled off the loop), advanced past the output tokens a resumed
        request carries at the end of its prompt."""
        matcher = await self.grammars.matcher(request.sampling.structured)
        if request.resume_offset:
            for tok in request.prompt_token_ids[-request.resume_offset :]:
                matcher.accept(tok)
        return matcher

    async def close(self) -> None:
        if self._grammars is not None:
            self._grammars.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ---- admission and cancellation ------------------------------------------------------------
    def _admit(self, request: GenerateRequest, grammar: Matcher | None = None) -> Sequence:
        if request.request_id in self.seqs:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise Overloaded(f"queue full ({self.config.max_queue} requests waiting)")
        p = request.sampling
        max_tokens = min(p.max_tokens, self.config.max_context - len(request.prompt_token_ids))
        if max_tokens < 1:
            raise ValueError(
                f"prompt of {len(request.prompt_token_ids)} tokens leaves no room in the context"
            )
        stops = stop_token_set(p, self.spec.eos_token_ids)
        detok = (
            self.tokenizer.detokenizer(request.prompt_token_ids, p.skip_special_tokens)
            if self.tokenizer
            else None
        )
        seq = Sequence(request.request_id, list(request.prompt_token_ids), max_tokens)
        sampling = SequenceSampling(p, stops, seq.prompt, seq.output, request.resume_offset, grammar=grammar)
        seq.state = RequestState(request, sampling, asyncio.Queue(), detok, stops)
        if p.prompt_logprobs is not None:  # every prompt position's logits: computed, not cached
            seq.state.prompt_logprobs = [None] * len(seq.prompt)
            seq.use_prefix_cache = False
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens += len(seq.prompt)
        self._ensure_running()
        self._wake.set()
        return seq

    def _abort(self, seq: Sequence) -> None:
        state: RequestState = seq.state
        if state.done:
            return
        state.done = True
        if seq not in self.in_flight:
            self._release(seq)
        state.queue.put_nowait(self._chunk(seq, [], "", "abort"))

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            chunks = self.scheduler.schedule()
            if not chunks:
                await asyncio.sleep(0.001)
                continue
            try:
                await self._step(chunks)
            except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
                log.exception("engine step failed")
                for c in chunks:
                    self._fail(c.seq, e)
            except asyncio.CancelledError as e:
                task = asyncio.current_task()
                if getattr(task, "cancelling", lambda: 1)():  # the engine is stopping
                    raise
                # a library raised CancelledError without this task being cancelled (grpc.aio does for a
                # call cancelled under it): a failed step like any other, not a dead engine loop
                log.error("engine step failed: CancelledError from a dependency", exc_info=e)
                for c in chunks:
                    self._fail(c.seq, RuntimeError("engine step cancelled by a dependency"))
            finally:
                self.in_flight.clear()
            await asyncio.sleep(0)  # let streams and new requests in between steps

    async def _step(self, chunks) -> None:
        t0 = time.perf_counter()
        self.in_flight = {c.seq for c in chunks}
        self.dispatcher.begin_step()
        with torch.inference_mode():
            parts = await asyncio.gather(*(self._forward(part) for part in self._split(chunks)))
            rows = [lg for lg in parts if lg is not None]
            logits = torch.cat(rows) if len(rows) > 1 else (rows[0] if rows else None)  # [B, V]
        self.steps += 1
        sampled = [c.seq for c in chunks if c.samples]
        if sampled:  # one batched call for the step's sampling rows
            toks, lps = sample(logits, [s.state.sampling for s in sampled])
            picks = dict(zip(map(id, sampled), zip(toks, lps, strict=True), strict=True))
        for c in chunks:
            self.scheduler.computed(c.seq, c.start + c.n)
            if c.samples:
                self._on_token(c.seq, *picks[id(c.seq)])
            elif c.seq.state.done:
                self._release(c.seq)
        if self.on_step is not None:
            self.on_step(time.perf_counter() - t0, chunks)

    def _split(self, chunks) -> list:
        """The step's chunks as 1 or 2 contiguous micro-batches of about equal tokens."""
        if self.config.micro_batches < 2 or len(chunks) < 2:
            return [chunks]
        total, acc = sum(c.n for c in chunks), 0
        for i, c in enumerate(chunks[:-1]):
            acc += c.n
            if acc * 2 >= total:
                return [chunks[: i + 1], chunks[i + 1 :]]
        return [chunks[:-1], chunks[-1:]]

    async def _forward(self, chunks) -> torch.Tensor | None:
        """One micro-batch: forward over its chunks, flattened; logits [b, V] of the chunks that sample."""
        segments, tokens, start = Segments(), [], 0
        for c in chunks:
            cache = PagedSequenceCache(self.pool, c.seq.block_table, c.start)
            segments.append(Segment(cache, start, c.n, c.start))
            tokens.extend(c.seq.token_slice(c.start, c.n))
            start += c.n
        if len(chunks) > 1 and all(c.n == 1 for c in chunks):
            segments.decode = PagedDecode(self.pool, [s.cache for s in segments])
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        h = await self.model.forward(ids, segments, self.dispatcher)  # [T, H]
        for s, c in zip(segments, chunks, strict=True):
            if c.seq.state.prompt_logprobs is not None:
                self._prompt_logprobs(c, h[s.start : s.start + s.n])
        last = [s.start + s.n - 1 for s, c in zip(segments, chunks, strict=True) if c.samples]
        return self.model.logits(h[last]) if last else None

    def _prompt_logprobs(self, c, h: torch.Tensor) -> None:
        """Logprob entries of the prompt tokens this chunk predicts (position p predicts token p + 1). A
        recompute after preemption writes the same entries again."""
        state: RequestState = c.seq.state
        prompt = c.seq.prompt
        stop = min(c.start + c.n, len(prompt) - 1)  # positions whose next token is still in the prompt
        if stop <= c.start:
            return
        logits = self.model.logits(h[: stop - c.start])
        entries = prompt_logprobs(
            logits, prompt[c.start + 1 : stop + 1], state.request.sampling.prompt_logprobs
        )
        state.prompt_logprobs[c.start + 1 : stop + 1] = entries

    def _on_token(self, seq: Sequence, tok: int, logprob: TokenLogprob | None) -> None:
        state: RequestState = seq.state
        if state.done:  # cancelled while its step was in flight
            self._release(seq)
            return
        seq.output.append(tok)
        self.tokens_generated += 1
        now = time.monotonic()
        if state.first_token_at is None:
            state.first_token_at = now
            self.ttft.observe(now - state.arrived_at)
        else:
            self.tpot.observe(now - state.last_token_at)
        state.last_token_at = now
        stop_token = tok in state.stops
        text = state.detok.add([tok]) if state.detok and not stop_token else ""  # a stop token is no text
        finish = None
        grammar = state.sampling.grammar
        if stop_token:
            finish = "stop"
        elif grammar is not None and (not grammar.accept(tok) or grammar.is_terminated()):
            finish = "stop"  # the grammar is complete (or, with ignore_eos, only a stop token could follow)
        elif len(seq.output) >= seq.max_tokens:
            finish = "length"
        text, hit = self._hold_back(state, text, final=finish is not None)
        if hit is not None:
            finish = "stop"
        if finish:
            state.done = True
            self._release(seq)
            self.requests_finished += 1
            self.finished_by_reason[finish] = self.finished_by_reason.get(finish, 0) + 1
            self.e2e.observe(now - state.arrived_at)
        chunk = self._chunk(seq, [tok], text, finish)
        chunk.stop_string = hit
        if logprob is not None:
            chunk.logprobs = [logprob]
        if state.prompt_logprobs is not None and len(seq.output) == 1:
            chunk.prompt_logprobs = state.prompt_logprobs
        state.queue.put_nowait(chunk)

    def _hold_back(self, state: RequestState, text: str, final: bool) -> tuple[str, str | None]:
        """Stop strings: returns (text safe to emit now, the stop string that matched, if one did)."""
        stops = state.request.sampling.stop
        if not stops:
            return (text + (state.detok.flush() if final and state.detok else "")), None
        pending = state.pending_text + text + (state.detok.flush() if final and state.detok else "")
        for s in stops:
            i = pending.find(s)
            if i >= 0:
                state.pending_text = ""
                return pending[:i], s
        keep = 0 if final else max(len(s) for s in stops) - 1
        cut = len(pending) - keep if keep else len(pending)
        state.pending_text = pending[cut:]
        return pending[:cut], None

    def _chunk(self, seq: Sequence, toks: list[int], text: str, finish: str | None) -> GenerateChunk:
        prompt_tokens, completion_tokens = seq.state.request.usage(len(seq.output))
        chunk = GenerateChunk(seq.request_id, toks, text, finish, prompt_tokens, completion_tokens)
        chunk.cached_tokens = seq.cached_tokens
        return chunk

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        state: RequestState = seq.state
        if not state.done:
            state.done = True
            state.queue.put_nowait(RuntimeError(f"request {seq.request_id} failed: {error}"))
        if seq.status is not Status.FINISHED:
            self._release(seq)
