"""Expert groups for an in-process engine: started as Ray actors, or attached through a registry.

These are the `emoe.dispatchers` entry points "grpc" and "dist" (pyproject.toml), which
`Engine.from_pretrained(dispatcher=...)` finds by name. Steps of `launch_expert_groups`:
  1. join the current Ray cluster, or start a local one (127.0.0.1, no dashboard);
  2. start a registry actor for this engine;
  3. start one `ExpertGroupReplica` actor per group (one GPU each when the cluster has GPUs), restarted by
     Ray if it dies, spread over nodes or packed as configured;
  4. wait until every group has registered an endpoint (its weights are loaded by then);
  5. return a `LaunchedDispatcher` whose close() shuts the actors and the registry down.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from emoe.wire import DTYPE_NAMES
from router.dispatch import DispatchContext, RemoteDispatcher, Transport
from router.dispatch.dist_transport import DistTransport
from router.dispatch.grpc_transport import grpc_transport

log = logging.getLogger(__name__)

NAMESPACE = "emoe"


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None:
        init_kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, namespace=NAMESPACE, **init_kwargs)


def make_transport(name: str, call_timeout_s: float = 30.0) -> Transport:
    if name == "grpc":
        return grpc_transport(call_timeout_s)
    if name == "dist":
        return DistTransport(call_timeout_s).transport()
    raise ValueError(f"unknown transport {name!r}; choices: dist, grpc")


def grpc_dispatcher(ctx: DispatchContext) -> RemoteDispatcher:
    return _dispatcher(ctx, "grpc")


def dist_dispatcher(ctx: DispatchContext) -> RemoteDispatcher:
    return _dispatcher(ctx, "dist")


def _dispatcher(ctx: DispatchContext, transport: str) -> RemoteDispatcher:
    if "registry" in ctx.options:
        return attach_expert_groups(ctx, transport)
    return launch_expert_groups(ctx, transport)


class LaunchedDispatcher(RemoteDispatcher):
    """A remote dispatcher that owns the actors it reaches: close() shuts them and their registry down."""

    def __init__(self, *args: Any, actors: list[Any], registry: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.actors, self.registry = actors, registry

    def close(self) -> None:
        import ray

        super().close()
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - already dead: nothing to drain
                log.info("replica shutdown: %s", e)
            ray.kill(a, no_restart=True)
        if self.registry is not None:
            ray.kill(self.registry, no_restart=True)
        self.actors, self.registry = [], None


def launch_expert_groups(ctx: DispatchContext, transport: str) -> LaunchedDispatcher:
    import ray

    from cluster.registry import Registry
    from cluster.registry_client import RegistryClient
    from experts.deployment import ExpertGroupReplica

    opts = dict(ctx.options)
    ensure_ray(opts.pop("ray_address", None))
    spread = opts.pop("spread", "pack")
    if spread not in ("pack", "spread"):
        raise ValueError(f"spread must be 'pack' or 'spread', got {spread!r}")
    start_timeout_s = float(opts.pop("start_timeout_s", 300.0))
    torch_threads = int(opts.pop("torch_threads", 1))
    replicas = int(opts.pop("replicas_per_group", 1))
    if replicas < 1:
        raise ValueError(f"replicas_per_group must be >= 1, got {replicas}")
    num_gpus = opts.pop("num_gpus", None)
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    tr = make_transport(transport, float(opts.pop("call_timeout_s", 30.0)))
    if opts:
        raise ValueError(f"unknown dispatcher option(s): {', '.join(sorted(opts))}")

    name = f"emoe-registry-{uuid.uuid4().hex[:8]}"
    registry = (
        ray.remote(Registry).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1).remote()
    )
    actor_cls = ray.remote(ExpertGroupReplica)
    n = ctx.placement.num_groups * replicas
    strategies = _spread_over_nodes(n, num_gpus) if spread == "spread" else ["DEFAULT"] * n
    actors = [
        actor_cls.options(
            num_gpus=num_gpus,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=strategies[g * replicas + r],
        ).remote(
            str(ctx.path),
            g,
            ctx.placement.to_json(),
            DTYPE_NAMES[ctx.dtype],
            registry,
            "127.0.0.1",
            torch_threads,
        )
        for g in range(ctx.placement.num_groups)
        for r in range(replicas)
    ]
    _wait_registered(registry, actors, len(actors), start_timeout_s)
    return LaunchedDispatcher(
        tr, RegistryClient(registry), ctx.placement, ctx.dtype, actors=actors, registry=registry
    )


def _spread_over_nodes(n: int, num_gpus: float) -> list:
    """Replica i pinned to node i mod N (nodes with GPUs, if replicas need them): an even, deterministic spread."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(
        node["NodeID"]
        for node in ray.nodes()
        if node["Alive"] and (num_gpus == 0 or node["Resources"].get("GPU", 0) >= num_gpus)
    )
    if not nodes:
        raise RuntimeError("no alive node can host an expert replica")
    return [NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False) for i in range(n)]


def attach_expert_groups(ctx: DispatchContext, transport: str) -> RemoteDispatcher:
    """A dispatcher to expert groups started by someone else (the Serve app), found through `registry`.

    Waits (bounded by `start_timeout_s`) until every group has at least one registered replica.
    """
    from cluster.registry_client import RegistryClient

    opts = dict(ctx.options)
    registry = opts.pop("registry")
    start_timeout_s = float(opts.pop("start_timeout_s", 600.0))
    tr = make_transport(transport, float(opts.pop("call_timeout_s", 30.0)))
    if opts:
        raise ValueError(f"unknown dispatcher option(s): {', '.join(sorted(opts))}")
    client = RegistryClient(registry)
    deadline = time.monotonic() + start_timeout_s
    while {e["group"] for e in client.snapshot()[1]} != set(range(ctx.placement.num_groups)):
        if time.monotonic() > deadline:
            client.close()
            raise TimeoutError(f"expert groups not all registered within {start_timeout_s}s")
        time.sleep(0.2)
    return RemoteDispatcher(tr, client, ctx.placement, ctx.dtype)


def _wait_registered(registry, actors, num_replicas: int, timeout_s: float) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        _, entries = ray.get(registry.snapshot.remote())
        if len(entries) == num_replicas:
            return
        # surface constructor failures (bad checkpoint, no GPU) instead of waiting out the timeout
        ready, _ = ray.wait([a.ping.remote() for a in actors], num_returns=len(actors), timeout=0.2)
        for ref in ready:
            ray.get(ref)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(entries)} of {num_replicas} replicas registered within {timeout_s}s"
            )
        time.sleep(0.1)
