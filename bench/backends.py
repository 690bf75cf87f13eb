"""What `emoe bench` runs the workload on: the engine backends (the AsyncEngine over the in-process, gRPC or
torch.distributed dispatcher, built here from its parts) and transformers' `generate`.

Each `run_*` returns (one RequestResult per request, extras: "wall_s" and the backend's own numbers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from bench.roofline import CountingDispatcher, Roofline, StepLog, roofline_summary
from bench.workload import RequestResult, Work, Workload
from emoe.api import GenerateRequest, SamplingParams
from emoe.placement import Placement
from emoe.spec import ModelSpec
from router.dispatch import DispatchContext, Dispatcher, get_dispatcher
from router.engine import AsyncEngine, EngineConfig
from router.model import load_router_model, parse_dtype

WARM_UP = Workload(requests=2, prompt_len=(8, 8), output_len=(4, 4), concurrency=2)


@asynccontextmanager
async def open_dispatcher(
    name: str,
    path: Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    device: str,
    groups: int,
    options: dict[str, Any],
) -> AsyncIterator[Dispatcher]:
    """The `name` dispatcher to `groups` contiguous expert groups, opened and closed in the running loop
    (a remote one closes its connections there; its launched groups are shut down)."""
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, groups)
    ctx = DispatchContext(Path(path), spec, dtype, torch.device(device), placement, options)
    dispatcher = get_dispatcher(name)(ctx)
    try:
        yield dispatcher
    finally:
        dispatcher.close()
        closing = asyncio.all_tasks() - {asyncio.current_task()}
        if closing:  # e.g. gRPC channels closing
            await asyncio.wait(closing, timeout=5)


# ---- engine backends (in-process and cluster) -----------------------------------------------------------
def run_engine(
    path: Path,
    backend: str,
    work: Work,
    workload: Workload,
    dtype: str,
    groups: int,
    micro_batches: int = 1,
    expert_threads: int = 1,
    roofline_bw: float | None = None,
    device: str = "cpu",
    prefix_caching: bool = True,
) -> tuple[list[RequestResult], dict[str, Any]]:
    """`backend`: "inprocess" (the local dispatcher) or a remote dispatcher's name ("grpc", "dist")."""
    torch_dtype = parse_dtype(dtype)
    spec, model = load_router_model(path, torch_dtype, device)
    roof = Roofline(spec, torch_dtype) if roofline_bw else None
    log = StepLog(roof)
    name = "local" if backend == "inprocess" else backend
    options = {} if name == "local" else {"torch_threads": expert_threads}

    async def serve() -> tuple[list[RequestResult], float, dict[str, Any]]:
        async with open_dispatcher(name, path, spec, torch_dtype, device, groups, options) as dispatcher:
            counted = CountingDispatcher(dispatcher, roof) if roof else dispatcher
            engine = AsyncEngine(
                spec, model, counted, engine_config(work, workload, micro_batches, prefix_caching)
            )
            engine.on_step = log
            try:
                await run_requests(engine, WARM_UP.make(spec.vocab_size), WARM_UP, "warm")
                log.steps.clear()
                results, wall = await run_requests(engine, work, workload, "bench")
            finally:
                await engine.close()
            return results, wall, dispatcher.stats()

    results, wall, stats = asyncio.run(serve())
    extra: dict[str, Any] = {"wall_s": wall}
    if roof is not None:
        extra["roofline"] = roofline_summary(log.steps, roofline_bw, workload.concurrency, roof)
    extra["decode_step_ms_median"] = log.full_decode_ms_median(workload.concurrency)
    lat = stats.get("dispatch_latency_s")
    if lat is not None:  # remote dispatchers time every group call
        extra["expert_call_ms_mean"] = lat["sum"] / lat["count"] * 1e3 if lat["count"] else float("nan")
    return results, extra


def engine_config(
    work: Work, workload: Workload, micro_batches: int, prefix_caching: bool = True
) -> EngineConfig:
    """KV, batch and queue room for the whole workload (and the warm-up requests) at once."""
    longest = max(max(len(p) + n for p, n, _ in work), 16)
    return EngineConfig(
        kv_blocks=max(256, workload.concurrency * (longest // 16 + 2)),
        block_size=16,
        max_batch_tokens=512,
        max_num_seqs=max(workload.concurrency, 1),
        max_queue=len(work) + 1,
        max_context=longest + 1,
        micro_batches=micro_batches,
        prefix_caching=prefix_caching,
    )


async def run_requests(
    engine: AsyncEngine, work: Work, workload: Workload, tag: str
) -> tuple[list[RequestResult], float]:
    """(results in request order, wall seconds): `workload.rate` set, each request is sent at its arrival
    offset; else `workload.concurrency` clients each send their next request when the last one is done."""
    results: list[RequestResult | None] = [None] * len(work)
    t0 = time.perf_counter()

    async def send(i: int, arrival: float) -> None:
        prompt, n, _ = work[i]
        req = GenerateRequest(f"{tag}-{i}", tuple(prompt), SamplingParams(max_tokens=n, ignore_eos=True))
        toks, times = [], []
        async for chunk in engine.generate(req):
            now = time.perf_counter()
            toks += chunk.token_ids
            times += [now] * len(chunk.token_ids)
        results[i] = RequestResult(toks, t0 + arrival, times)

    async def at_arrival(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + work[i][2] - time.perf_counter()))
        await send(i, work[i][2])

    queue = list(range(len(work)))[::-1]

    async def client() -> None:
        while queue:
            await send(queue.pop(), time.perf_counter() - t0)

    if workload.rate:
        await asyncio.gather(*(at_arrival(i) for i in range(len(work))))
    else:
        await asyncio.gather(*(client() for _ in range(workload.concurrency)))
    return results, time.perf_counter() - t0


# ---- transformers backend ----------------------------------------------------------------------------
def run_transformers(
    path: Path, work: Work, workload: Workload, dtype: str, device: str = "cpu"
) -> tuple[list[RequestResult], dict[str, Any]]:
    """Static batches of up to `concurrency` arrived requests, left padded, greedy; token times from a
    logits processor (the moment each step's logits exist, as if the batch streamed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype)).to(device).eval()
    generate_batch([(work[0][0][:8], 2)], model, device)  # warm-up
    results: list[RequestResult | None] = [None] * len(work)
    t0 = time.perf_counter()
    pending = list(range(len(work)))
    while pending:
        now = time.perf_counter() - t0
        arrived = [i for i in pending if work[i][2] <= now]
        if not arrived:  # open loop: wait for the next arrival
            time.sleep(max(0.0, work[pending[0]][2] - now))
            continue
        batch = arrived[: workload.concurrency]
        start = time.perf_counter()
        outs = generate_batch([(work[i][0], work[i][1]) for i in batch], model, device)
        for i, (toks, times) in zip(batch, outs, strict=True):
            arrival = t0 + work[i][2] if workload.rate else start
            results[i] = RequestResult(toks, arrival, times)
        pending = [i for i in pending if i not in set(batch)]
    wall = time.perf_counter() - t0
    return results, {"wall_s": wall}


def generate_batch(
    batch: list[tuple[list[int], int]], model, device: str
) -> list[tuple[list[int], list[float]]]:
    """[(prompt, new tokens)] -> [(tokens, the time each token's logits existed)], one `generate` call."""
    from transformers import LogitsProcessorList

    longest = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    new = max(n for _, n in batch)
    clock = StepClock(device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    gen = out[:, longest:]
    return [(gen[i, :n].tolist(), clock.times[:n]) for i, (_, n) in enumerate(batch)]


class StepClock:
    """A transformers logits processor that records when each step's logits exist (after a device sync)."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.sync()
        self.times.append(time.perf_counter())
        return scores
