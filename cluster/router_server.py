"""The Router deployment: a router replica, a thin shell around the AsyncEngine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch

from cluster.config import AppConfig, parse_config
from cluster.launch import attach_expert_groups
from emoe.api import GenerateChunk, GenerateRequest, ModelInfo
from emoe.generation import GenerationDefaults
from emoe.placement import Placement
from emoe.tokenizer import Tokenizer
from router.dispatch import DispatchContext, Dispatcher, LocalDispatcher
from router.engine import AsyncEngine
from router.model import load_router_model, parse_dtype

log = logging.getLogger(__name__)


def _replica_id() -> str:
    """Serve's id of this replica (what `serve status` names), or the process id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica
        return f"pid-{os.getpid()}"


def sampling_defaults(cfg: AppConfig) -> tuple[tuple[str, float], ...]:
    """The release's recommended sampling (generation_config.json), unless configured to ignore it."""
    if cfg.generation_config == "ignore":
        return ()
    return tuple(GenerationDefaults.from_pretrained(cfg.model).sampling().items())


class RouterServer:
    """A router replica: loads the dense half, attaches to the expert groups, runs the AsyncEngine."""

    async def __init__(self, config: dict[str, Any], registry: Any = None, expert_groups: list | None = None):
        cfg = parse_config(config)
        if cfg.router_torch_threads:
            torch.set_num_threads(cfg.router_torch_threads)
        dtype = parse_dtype(cfg.dtype)
        spec, model = load_router_model(cfg.model, dtype)
        placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, cfg.groups)
        ctx = DispatchContext(Path(cfg.model), spec, dtype, model.device, placement)
        dispatcher: Dispatcher
        if cfg.transport == "local":
            dispatcher = LocalDispatcher.from_context(ctx)
        else:
            ctx = dataclasses.replace(ctx, options={"registry": registry})
            dispatcher = attach_expert_groups(ctx, cfg.transport)
        econf = cfg.engine_config(spec.max_context)
        self.info_ = ModelInfo(
            name=cfg.served_name,
            family=spec.family,
            vocab_size=spec.vocab_size,
            max_context=econf.max_context,
            max_tokens_limit=min(cfg.max_tokens_limit, econf.max_context - 1),
            eos_token_ids=spec.eos_token_ids,
            num_groups=cfg.groups,
            transport=cfg.transport,
            sampling_defaults=sampling_defaults(cfg),
        )
        self.dispatcher = dispatcher
        self.engine = AsyncEngine(spec, model, dispatcher, econf, Tokenizer(cfg.model))
        self.router_id = _replica_id()
        self._publisher = (
            asyncio.get_running_loop().create_task(self._publish(registry)) if registry else None
        )

    async def _publish(self, registry: Any, interval_s: float = 1.0) -> None:
        """This replica's stats to the Registry every `interval_s` (the Frontend merges every router's)."""
        while True:
            try:
                await registry.publish_router_stats.remote(self.router_id, await self.stats())
            except Exception as e:  # noqa: BLE001 - the registry restarting: publish again next tick
                log.debug("router stats not published: %s", e)
            await asyncio.sleep(interval_s)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        async for chunk in self.engine.generate(request):
            yield chunk

    async def cancel(self, request_id: str) -> None:
        await self.engine.cancel(request_id)

    async def info(self) -> ModelInfo:
        return self.info_

    async def stats(self) -> dict:
        out = self.engine.stats()
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["pid"] = os.getpid()
        out["model"] = self.info_.name
        out.update(self.dispatcher.stats())  # tokens sent to each group, failovers, placement in use
        return out
