"""Several choices of one API request (`n` per prompt, batched prompts): one backend request per choice,
their chunks merged into one stream tagged by `index`. Closing the merged stream closes every choice's stream, which cancels it at the
backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator

from emoe.api import GenerateChunk, GenerateRequest, InferenceBackend

MAX_N = 16


def choice(request: GenerateRequest, index: int, total: int) -> GenerateRequest:
    """Choice `index` of `total` (prompts x n): request `<id>/<index>`, seeded with seed + index, so each
    choice is reproducible and the choices differ; the request itself when it is the only one."""
    if total == 1:
        return request
    s = request.sampling
    sampling = s if s.seed is None else dataclasses.replace(s, seed=s.seed + index)
    return dataclasses.replace(request, request_id=f"{request.request_id}/{index}", sampling=sampling)


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
