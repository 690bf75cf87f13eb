"""The Serve application: `cluster.app:build_app` (for `serve run`, `serve deploy` and KubeRay serveConfigV2).

Deployments (DESIGN §3):
  Frontend          ingress: OpenAI HTTP (FastAPI, on Serve's HTTP proxy) + the gRPC Inference API
                    (its own grpc.aio server, for Health, reflection and stream control; one replica)
  Router            the dense half and continuous batching (AsyncEngine), `routers` replicas
  ExpertGroup-<g>   the routed experts of group g (ExpertGroupReplica), one GPU per replica on GPU clusters
  Registry          singleton: data-plane endpoints of expert replicas, long-polled by routers
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import resource
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError

from cluster.config import AppConfig, parse_config
from cluster.registry import Registry
from emoe.api import GenerateChunk, GenerateRequest, ModelInfo
from emoe.placement import Placement
from emoe.spec import ModelSpec
from experts.deployment import ExpertGroupReplica

log = logging.getLogger(__name__)

APP_NAME = "emoe"
HIGH_CONCURRENCY = 100_000  # the engine does its own admission control
GRACEFUL_SHUTDOWN_S = 5.0


class RouterServer:
    """A router replica: loads the dense half, attaches to the expert groups, runs the AsyncEngine."""

    def __init__(self, config: dict[str, Any], registry: Any = None, expert_groups: list | None = None):
        from cluster.launch import attach_expert_groups
        from emoe.tokenizer import Tokenizer
        from router.dispatch import DispatchContext, LocalDispatcher
        from router.engine import AsyncEngine
        from router.model import load_router_model, parse_dtype

        cfg = parse_config(config)
        if cfg.router_torch_threads:
            torch.set_num_threads(cfg.router_torch_threads)
        dtype = parse_dtype(cfg.dtype)
        spec, model = load_router_model(cfg.model, dtype)
        placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, cfg.groups)
        ctx = DispatchContext(Path(cfg.model), spec, dtype, model.device, placement)
        if cfg.transport == "local":
            dispatcher = LocalDispatcher.from_context(ctx)
        else:
            ctx = dataclasses.replace(ctx, options={"registry": registry})
            dispatcher = attach_expert_groups(ctx, cfg.transport)
        econf = cfg.engine_config(spec.max_position_embeddings)
        self.info_ = ModelInfo(
            name=cfg.served_name,
            family=spec.family,
            vocab_size=spec.vocab_size,
            max_context=econf.max_context,
            max_tokens_limit=min(cfg.max_tokens_limit, econf.max_context - 1),
            eos_token_ids=spec.eos_token_ids,
            num_groups=cfg.groups,
            transport=cfg.transport,
        )
        self.dispatcher = dispatcher
        self.engine = AsyncEngine(spec, model, dispatcher, econf, Tokenizer(cfg.model))

    async def generate(self, request: GenerateRequest):
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
        out.update(self.dispatcher.stats())  # tokens sent to each group, failovers, placement in use
        return out


class RouterBackend:
    """`InferenceBackend` over the Router deployment's handle (streaming calls, cancel by closing).

    Resumption, in steps, when the router serving a stream dies: 1. keep every token already sent;
    2. send a new request to another router with prompt + those tokens, the remaining max_tokens and the
    same seed (`resume_offset` keeps sampling reproducible); 3. go on streaming, so the client sees no
    error, no duplicated and no missing token."""

    MAX_RESUMES = 3

    def __init__(self, router: Any, info: ModelInfo):
        self.router, self._info = router, info
        self._live: dict[str, Any] = {}
        self.resumed = 0

    def info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerateRequest):
        sent: list[int] = []
        req, attempt = request, 0
        while True:
            try:
                async for chunk in self._stream(req):
                    sent.extend(chunk.token_ids)
                    chunk.prompt_tokens, chunk.completion_tokens = len(request.prompt_token_ids), len(sent)
                    chunk.request_id = request.request_id
                    yield chunk
                return
            except RayActorError as e:
                if attempt >= self.MAX_RESUMES or len(sent) >= request.sampling.max_tokens:
                    raise
                attempt += 1
                self.resumed += 1
                log.warning(
                    "router died during %s (%s): resuming after %d tokens", request.request_id, e, len(sent)
                )
                req = _resumed(request, sent, attempt)

    async def _stream(self, request: GenerateRequest):
        gen = self.router.options(stream=True).generate.remote(request)
        self._live[request.request_id] = gen
        finished = False
        try:
            async for chunk in gen:
                finished = bool(chunk.finish_reason)
                yield chunk
        finally:
            self._live.pop(request.request_id, None)
            if not finished:  # the consumer went away: stop the router's generation (frees its KV blocks)
                gen.cancel()

    async def cancel(self, request_id: str) -> None:
        for rid in [r for r in self._live if r == request_id or r.startswith(request_id + "~")]:
            gen = self._live.pop(rid, None)
            if gen is not None:
                gen.cancel()


def _resumed(request: GenerateRequest, sent: list[int], attempt: int) -> GenerateRequest:
    s = request.sampling
    return GenerateRequest(
        request_id=f"{request.request_id}~{attempt}",
        prompt_token_ids=tuple(request.prompt_token_ids) + tuple(sent),
        sampling=dataclasses.replace(s, max_tokens=s.max_tokens - len(sent)),
        prompt_text=request.prompt_text,
        resume_offset=request.resume_offset + len(sent),
    )


@serve.ingress()
class Frontend:
    async def __init__(self, config: dict[str, Any], router: Any, registry: Any = None):
        from cluster.grpc_api import InferenceServicer, start_grpc_server
        from emoe.tokenizer import Tokenizer

        self.cfg: AppConfig = _with_env_tokens(parse_config(config))
        self.tokenizer = Tokenizer(self.cfg.model)
        self.router, self.registry = router, registry
        info = await router.info.remote()
        self.backend = RouterBackend(router, info)
        tls = _read_tls(self.cfg)
        token = self.cfg.api_token.get_secret_value() if self.cfg.api_token else None
        self.grpc_server, self.grpc_port = await start_grpc_server(
            InferenceServicer(self.backend, self.tokenizer),
            self.cfg.host,
            self.cfg.grpc_port,
            tls_cert=tls[0],
            tls_key=tls[1],
            api_token=token,
        )
        log.info("gRPC Inference API on %s:%d", self.cfg.host, self.grpc_port)
        from cluster.ops import OpsState

        self.ops = OpsState(router, registry, serve.get_replica_context().app_name, self.cfg.groups)
        self.ops.start()
        from cluster.errors import add_error_observer

        add_error_observer(self.ops.count_rejected)

    def __serve_build_asgi_app__(self):
        from cluster.http_api import build_http_app
        from cluster.ops_http import add_ops_routes

        token = self.cfg.api_token.get_secret_value() if self.cfg.api_token else None
        app = build_http_app(self.backend, self.tokenizer, model_name=self.cfg.served_name, api_token=token)
        admin = self.cfg.admin_token.get_secret_value() if self.cfg.admin_token else None
        add_ops_routes(app, self.ops, self.registry, admin)
        return app

    async def addresses(self) -> dict[str, Any]:
        return {"grpc_port": self.grpc_port, "host": self.cfg.host}

    async def frontend_stats(self) -> dict[str, Any]:
        return {"resumed_streams": self.backend.resumed, "rejected": dict(self.ops.rejected)}

    async def ops_state(self) -> dict:
        return self.ops.state()

    async def router_stats(self) -> dict:
        return await self.router.stats.remote()

    async def load_report(self) -> dict:
        return await self.registry.load_report.remote()

    async def placement_state(self) -> dict:
        return await self.registry.placement_state.remote()

    async def admin_replace(self, admin_token: str | None = None) -> dict:
        """Admin action: re-place hot experts now (requires the admin token when one is configured)."""
        from cluster.errors import Unauthenticated

        want = self.cfg.admin_token.get_secret_value() if self.cfg.admin_token else None
        if want is not None and not hmac.compare_digest((admin_token or "").encode(), want.encode()):
            raise Unauthenticated("admin token missing or wrong")
        return await self.registry.replace.remote()


def _with_env_tokens(cfg: AppConfig) -> AppConfig:
    """Tokens named by `api_token_env` / `admin_token_env`, read here in the replica (so they never sit
    in Serve's stored config); a named variable that is unset is an error naming it."""
    update = {}
    for field, env in (("api_token", cfg.api_token_env), ("admin_token", cfg.admin_token_env)):
        if env:
            value = os.environ.get(env)
            if not value:
                raise ValueError(f"{field}_env: environment variable {env!r} is not set")
            update[field] = SecretStr(value)
    return cfg.model_copy(update=update) if update else cfg


def _read_tls(cfg: AppConfig) -> tuple[bytes | None, bytes | None]:
    if not cfg.tls_cert_file:
        return None, None
    return Path(cfg.tls_cert_file).read_bytes(), Path(cfg.tls_key_file).read_bytes()


def _gpus_per_replica(cfg: AppConfig) -> float:
    if cfg.gpus_per_expert_replica is not None:
        return cfg.gpus_per_expert_replica
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _replica_env(cfg: AppConfig) -> dict[str, Any]:
    return {
        "env_vars": {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(cfg.metrics_push_interval_s)}
    }


def _scaling(cfg: AppConfig) -> dict[str, Any]:
    """num_replicas, or an autoscaling_config with our policy (delays applied by the policy, not Serve)."""
    if not cfg.autoscaling:
        return {"num_replicas": cfg.replicas_per_group}
    policy_kwargs = {
        "target_tokens_per_s": cfg.target_tokens_per_s,
        "min_replicas": cfg.min_replicas_per_group,
        "max_replicas": cfg.max_replicas_per_group,
        "gpu_budget": cfg.gpu_budget,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
    }
    return {
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas_per_group,
            "max_replicas": cfg.max_replicas_per_group,
            "initial_replicas": max(
                cfg.min_replicas_per_group, min(cfg.replicas_per_group, cfg.max_replicas_per_group)
            ),
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "look_back_period_s": max(2 * cfg.metrics_push_interval_s, 1.0),
            "policy": {
                "policy_function": "cluster.autoscale:ExpertGroupPolicy",
                "policy_kwargs": policy_kwargs,
            },
        }
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Builds the application from AppConfig fields (a dict: Serve builder args, YAML or CLI flags)."""
    cfg = parse_config(dict(args or {}))
    cfg = cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})
    spec = ModelSpec.from_pretrained(cfg.model)
    args = cfg.to_args()
    registry = serve.deployment(
        Registry,
        name="Registry",
        num_replicas=1,
        max_ongoing_requests=HIGH_CONCURRENCY,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    )
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, cfg.groups)
    registry_app = registry.options(ray_actor_options={"num_cpus": 0}).bind(
        placement.to_json(),
        replace_threshold=cfg.replace_imbalance_threshold,
        replace_after_s=cfg.replace_after_s,
        # one key per deployment: a restarted Registry replica restores it, a new deployment starts fresh
        state_key=f"registry/{uuid.uuid4().hex}",
    )
    groups = []
    if cfg.transport != "local":
        gpus = _gpus_per_replica(cfg)
        for g in range(cfg.groups):
            dep = serve.deployment(
                ExpertGroupReplica,
                name=f"ExpertGroup-{g}",
                max_ongoing_requests=HIGH_CONCURRENCY,
                graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
                ray_actor_options={"num_cpus": 0, "num_gpus": gpus, "runtime_env": _replica_env(cfg)},
                **_scaling(cfg),
            )
            groups.append(
                dep.bind(
                    cfg.model,
                    g,
                    placement.to_json(),
                    cfg.dtype,
                    registry_app,
                    cfg.data_plane_host,
                    cfg.expert_torch_threads,
                )
            )
    router = serve.deployment(
        RouterServer,
        name="Router",
        num_replicas=cfg.routers,
        max_ongoing_requests=HIGH_CONCURRENCY,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": 0},
    ).bind(args, registry_app, groups)
    frontend = serve.deployment(
        Frontend,
        name="Frontend",
        num_replicas=1,
        max_ongoing_requests=HIGH_CONCURRENCY,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": 0},
    )
    return frontend.bind(args, router, registry_app)


__all__ = ["APP_NAME", "GenerateChunk", "build_app"]
