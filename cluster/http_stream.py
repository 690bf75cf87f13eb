"""Streaming for the HTTP API: reading the backend stream, the SSE body and response, and what happens
when the client goes away (the request is cancelled at the backend, shielded from the handler's own
cancellation; a finished one is not)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from cluster.openai_schema import Reply
from emoe.api import GenerateChunk, InferenceBackend

log = logging.getLogger(__name__)
T = TypeVar("T")


async def collect(first: GenerateChunk, chunks: AsyncGenerator[GenerateChunk, None]) -> dict[int, tuple]:
    """Per choice index: (whole text, last chunk, logprob entries, prompt logprob entries or None, token
    ids), of a stream whose first chunk was already read."""
    parts: dict[int, list[str]] = {}
    lasts: dict[int, GenerateChunk] = {}
    entries: dict[int, list] = {}
    prompts: dict[int, list | None] = {}
    ids: dict[int, list[int]] = {}
    chunk = first
    while chunk is not None:
        i = chunk.index
        parts.setdefault(i, []).append(chunk.text)
        ids.setdefault(i, []).extend(chunk.token_ids)
        entries.setdefault(i, []).extend(chunk.logprobs or ())
        if chunk.prompt_logprobs is not None or i not in prompts:
            prompts[i] = chunk.prompt_logprobs
        lasts[i] = chunk
        chunk = await anext(chunks, None)
    return {i: ("".join(parts[i]), lasts[i], entries[i], prompts[i], ids[i]) for i in lasts}


async def sse_events(
    reply: Reply,
    first: GenerateChunk,
    chunks: AsyncGenerator[GenerateChunk, None],
    include_usage: bool,
    error_event: Callable[[Exception], dict],
    num_choices: int = 1,
) -> AsyncIterator[str]:
    """The SSE body; sets `reply.finished` once the backend stream ended. A backend error after the
    headers went out becomes the event `error_event(exc)`."""
    lasts: dict[int, GenerateChunk] = {}
    chunk = first
    try:
        if reply.chat:
            for index in range(num_choices):
                yield sse(reply.role_chunk(index))
        while chunk is not None:
            lasts[chunk.index] = chunk
            if chunk.text or chunk.finish_reason or chunk.logprobs or reply.echo_pending(chunk.index):
                event = reply.chunk(chunk)
                if event is not None:
                    yield sse(event)
            chunk = await anext(chunks, None)
        reply.finished = True
        if include_usage:
            yield sse(reply.usage_chunk(lasts))
        yield "data: [DONE]\n\n"
    except Exception as exc:
        yield sse(error_event(exc))


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """SSE response that, however it ends (done, client gone, send failed), closes its event iterator and
    then calls `release(reply.finished)`, which cancels the backend request unless it had finished."""

    def __init__(self, events: AsyncIterator[str], reply: Reply, release: Callable[[bool], Awaitable[None]]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._reply, self._release = reply, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._release(self._reply.finished)


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, unless the client disconnects first: then `work` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def release_backend(
    backend: InferenceBackend, request_id: str, chunks: AsyncGenerator[GenerateChunk, None], finished: bool
) -> None:
    """Closes the backend stream and, unless it finished, cancels the request. Never raises; shielded."""
    with anyio.CancelScope(shield=True):
        if not finished:
            try:
                await backend.cancel(request_id)
            except Exception as exc:
                log.debug("cancel of %s: %r", request_id, exc)
        try:
            await chunks.aclose()
        except Exception as exc:
            log.debug("closing the stream of %s: %r", request_id, exc)
