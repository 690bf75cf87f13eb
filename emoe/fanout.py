"""`n` choices of one request: n backend requests, their chunks merged into one stream tagged by `index`.

Both frontends use this, so `n` means the same over gRPC and HTTP. Choice i is request `<id>/<i>` (the
request itself when n is 1); with a seed, choice i samples with seed + i, so each choice is reproducible
and the choices differ. Closing the merged stream closes every choice's stream, which cancels it at the
backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator

from emoe.api import GenerateChunk, GenerateRequest, InferenceBackend, InvalidRequest

MAX_N = 16


def choices(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The backend requests of `n` choices of `request`; n outside [1, MAX_N] is InvalidRequest("n")."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise InvalidRequest("n", f"must be an integer in [1, {MAX_N}], got {n!r}")
    if n == 1:
        return [request]
    seed = request.sampling.seed
    return [
        dataclasses.replace(
            request,
            request_id=f"{request.request_id}/{i}",
            sampling=request.sampling
            if seed is None
            else dataclasses.replace(request.sampling, seed=seed + i),
        )
        for i in range(n)
    ]


async def fan_out(
    backend: InferenceBackend, requests: list[GenerateRequest]
) -> AsyncGenerator[GenerateChunk, None]:
    """The chunks of every request as they come, `index` set to the request's position in `requests` and
    `request_id` to the first one's (without its `/i`). A choice's error ends the merged stream with it."""
    if len(requests) == 1:
        async for chunk in backend.generate(requests[0]):
            yield chunk
        return
    parent = requests[0].request_id.rsplit("/", 1)[0]
    queue: asyncio.Queue = asyncio.Queue()
    streams = [backend.generate(r) for r in requests]

    async def pump(i: int, stream: AsyncGenerator[GenerateChunk, None]) -> None:
        try:
            async for chunk in stream:
                await queue.put(dataclasses.replace(chunk, index=i, request_id=parent))
            await queue.put(i)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, int):
                left -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            try:
                await stream.aclose()
            except Exception:  # noqa: BLE001 - already failed; nothing more to free
                pass
