"""The Serve application: `cluster.app:build_app` (for `serve run`, `serve deploy` and KubeRay serveConfigV2).

Deployments (DESIGN §3):
  Frontend          ingress: OpenAI HTTP (FastAPI, on Serve's HTTP proxy) + the gRPC Inference API
                    (its own grpc.aio server, for Health, reflection and stream control; one replica)
                    (cluster/frontend.py)
  Router            the dense half and continuous batching (AsyncEngine), `routers` replicas
                    (cluster/router_server.py)
  ExpertGroup-<g>   the routed experts of group g (ExpertGroupReplica), one GPU per replica on GPU clusters
  Registry          singleton: data-plane endpoints of expert replicas, long-polled by routers

This module turns an AppConfig into those deployments: their shared options, and replica counts or the
autoscaling config of the expert groups.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from ray import serve

from cluster.config import AppConfig, parse_config
from cluster.frontend import Frontend
from cluster.registry import Registry
from cluster.router_server import RouterServer
from emoe.placement import Placement
from emoe.spec import ModelSpec
from experts.deployment import ExpertGroupReplica

APP_NAME = "emoe"
HIGH_CONCURRENCY = 100_000  # the engine does its own admission control
GRACEFUL_SHUTDOWN_S = 5.0


def _deployment(cls: type, name: str, ray_actor_options: dict[str, Any] | None = None, **options: Any):
    """`cls` as a Serve deployment with the options all of ours share: no Serve-side request limit
    (HIGH_CONCURRENCY), a short graceful shutdown, no CPU reserved, plus `ray_actor_options` / `options`."""
    return serve.deployment(
        cls,
        name=name,
        max_ongoing_requests=HIGH_CONCURRENCY,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": 0, **(ray_actor_options or {})},
        **options,
    )


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
    placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, cfg.groups)
    registry = _deployment(Registry, "Registry", num_replicas=1).bind(
        placement.to_json(),
        replace_threshold=cfg.replace_imbalance_threshold,
        replace_after_s=cfg.replace_after_s,
        # one key per deployment: a restarted Registry replica restores it, a new deployment starts fresh
        state_key=f"registry/{uuid.uuid4().hex}",
    )
    groups = []
    if cfg.transport != "local":
        options = {"num_gpus": _gpus_per_replica(cfg), "runtime_env": _replica_env(cfg)}
        for g in range(cfg.groups):
            dep = _deployment(ExpertGroupReplica, f"ExpertGroup-{g}", options, **_scaling(cfg))
            groups.append(
                dep.bind(
                    cfg.model,
                    g,
                    placement.to_json(),
                    cfg.dtype,
                    registry,
                    cfg.data_plane_host,
                    cfg.expert_torch_threads,
                )
            )
    routing = {}
    if cfg.prefix_aware_routing and cfg.prefix_caching and cfg.routers > 1:
        from ray.serve.config import RequestRouterConfig

        routing["request_router_config"] = RequestRouterConfig(
            request_router_class="cluster.prefix_routing:PrefixAffinityRouter",
            request_router_kwargs={"imbalance": cfg.prefix_routing_imbalance},
        )
    router = _deployment(RouterServer, "Router", num_replicas=cfg.routers, **routing).bind(
        args, registry, groups
    )
    return _deployment(Frontend, "Frontend", num_replicas=1).bind(args, router, registry)


__all__ = ["APP_NAME", "build_app"]
