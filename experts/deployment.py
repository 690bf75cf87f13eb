"""ExpertGroupReplica: one replica of one expert group. A plain Ray actor now; the same class, unchanged,
is the replica of the Serve deployment `ExpertGroup-<g>`.

The constructor does everything a replica needs before it takes traffic, in order:
  1. pick its device (the GPU Ray assigned it, else CPU);
  2. read only its slice of the checkpoint;
  3. start its data-plane servers (gRPC and torch.distributed) on OS-assigned ports;
  4. register its endpoints with the registry actor (so routers learn of it only once it can serve).
A restarted replica (Ray `max_restarts`) runs the constructor again and re-registers under the same
actor id, replacing its dead endpoints.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from emoe.checkpoint import Checkpoint
from emoe.handles import call, call_in_thread
from emoe.placement import Placement
from emoe.spec import ModelSpec
from emoe.wire import WIRE_DTYPES
from experts.dist_server import DistExpertServer
from experts.server import ExpertServicer, GrpcExpertServer
from experts.service import ExpertGroupCore
from experts.store import ExpertStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    actor_id: str
    group: int
    placement_version: int
    grpc_endpoint: str
    dist_endpoint: str
    dist_backend: str
    node_id: str
    gpu_ids: tuple[str, ...]
    device: str
    tensors_read: tuple[str, ...]
    pid: int
    placement_versions: tuple[int, ...] = ()


class ExpertGroupReplica:
    def __init__(
        self,
        model_path: str,
        group: int,
        placement_json: str,
        dtype: str = "float32",
        registry: Any = None,
        host: str = "127.0.0.1",
        torch_threads: int = 1,
    ):
        import ray

        t0 = time.perf_counter()
        torch.set_num_threads(torch_threads)
        ctx = ray.get_runtime_context()
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        self.device = (
            torch.device("cuda", 0) if gpu_ids and torch.cuda.is_available() else torch.device("cpu")
        )
        placement = Placement.from_json(placement_json)
        spec = ModelSpec.from_pretrained(model_path)
        ckpt = Checkpoint(model_path, spec)
        try:
            store = ExpertStore.from_checkpoint(ckpt, spec, placement.groups[group], WIRE_DTYPES[dtype])
        finally:
            ckpt.close()
        store.to(self.device)
        self.replica_id = uuid.uuid4().hex[:12]
        self.core = ExpertGroupCore(store, group, placement.version, spec.hidden_size, self.device)
        # "node": listen on every interface, advertise this node's IP (routers on other nodes must reach it)
        bind, advertise = ("0.0.0.0", ray.util.get_node_ip_address()) if host == "node" else (host, host)
        self.grpc = GrpcExpertServer(
            ExpertServicer(self.core, self.replica_id, WIRE_DTYPES[dtype]), bind, advertise
        )
        self.dist = DistExpertServer(self.core, bind, advertise=advertise)
        self.info = ReplicaInfo(
            replica_id=self.replica_id,
            actor_id=ctx.get_actor_id() or self.replica_id,
            group=group,
            placement_version=placement.version,
            grpc_endpoint=self.grpc.start(),
            dist_endpoint=self.dist.start(),
            dist_backend=self.dist.backend,
            node_id=ctx.get_node_id(),
            gpu_ids=gpu_ids,
            device=str(self.device),
            tensors_read=tuple(sorted(ckpt.stats.tensors_read)),
            pid=os.getpid(),
            placement_versions=(placement.version,),
        )
        self._model_path, self._spec, self._dtype = model_path, spec, WIRE_DTYPES[dtype]
        self._active_seen: tuple[int, float] | None = None
        self._registry = registry
        self.group_loads: dict[int, float] = {}
        self.overrides: dict[int, int] = {}
        self._stop = threading.Event()
        if registry is not None:
            call_in_thread(registry, "register", asdict(self.info))
            threading.Thread(target=self._poll_loads, name="emoe-loads", daemon=True).start()
        log.info(
            "expert group %d replica %s ready in %.2fs", group, self.replica_id, time.perf_counter() - t0
        )

    def describe(self) -> dict:
        return asdict(self.info)

    def ping(self) -> str:
        return self.replica_id

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve custom autoscaling metrics: this replica's routed tokens/s and busy fraction, plus the
        registry's view of every group's load (so each group's policy sees the whole cluster)."""
        out = {
            "routed_tokens_per_s": self.core.meter.rate(),
            "busy_fraction": self.core.meter.busy_fraction(),
        }
        out.update({f"group_load_{g}": v for g, v in self.group_loads.items()})
        out.update({f"override_{g}": float(v) for g, v in self.overrides.items()})
        return out

    def _poll_loads(self) -> None:
        """Every second: re-register (a no-op unless the registry restarted and lost us), read the
        cluster's group loads (for autoscaling) and the placement state (for live re-placement: load the
        slice of a pending version, drop versions older than the active one)."""
        while not self._stop.wait(1.0):
            try:
                call(
                    self._registry, "register", asdict(self.info), timeout_s=5
                )  # heartbeat: restores a restarted registry
                report = call(self._registry, "load_report", timeout_s=5)
                self.group_loads = {int(g): float(v) for g, v in report["group_loads"].items()}
                self.overrides = {int(g): int(v) for g, v in report.get("overrides", {}).items()}
                self._follow_placement(call(self._registry, "placement_state", timeout_s=5))
            except Exception as e:  # noqa: BLE001 - registry restarting or gone: keep the last view
                log.debug("registry poll: %s", e)

    def _follow_placement(self, state: dict) -> None:
        pending, active = state.get("pending"), state.get("active_version")
        if pending:
            placement = Placement.from_json(pending)
            if placement.version not in self.core.stores:
                self._load_version(placement)
        if active is not None and len(self.core.stores) > 1 and active in self.core.stores:
            seen = (
                self._active_seen
                if self._active_seen and self._active_seen[0] == active
                else (active, time.time())
            )
            self._active_seen = seen
            if time.time() - seen[1] > self.OLD_VERSION_GRACE_S:  # steps in flight on the old one are done
                self.core.drop_versions_below(active)
                self._reregister()

    OLD_VERSION_GRACE_S = 10.0

    def _load_version(self, placement: Placement) -> None:
        t0 = time.perf_counter()
        ckpt = Checkpoint(self._model_path, self._spec)
        try:
            store = ExpertStore.from_checkpoint(
                ckpt, self._spec, placement.groups[self.core.group], self._dtype
            )
        finally:
            ckpt.close()
        self.core.add_version(placement.version, store.to(self.device))
        self._reregister()
        log.info(
            "group %d: placement v%d loaded in %.2fs",
            self.core.group,
            placement.version,
            time.perf_counter() - t0,
        )

    def _reregister(self) -> None:
        self.info = replace(self.info, placement_versions=tuple(sorted(self.core.stores)))
        if self._registry is not None:
            call(self._registry, "register", asdict(self.info), timeout_s=10)

    def shutdown(self, drain_s: float = 1.0) -> None:
        """Drains, in steps: 1. deregister (routers stop picking this replica at their next call);
        2. wait `drain_s` for calls already sent; 3. stop the servers (gRPC gives in-flight calls a grace
        period). A call that still arrives fails over to another replica on the router side."""
        self._stop.set()
        if self._registry is not None:
            call_in_thread(self._registry, "deregister", self.replica_id, timeout_s=2)
            self._registry = None
            time.sleep(drain_s)
        self.grpc.stop()
        self.dist.stop()

    def __del__(self) -> None:  # Serve calls this when it stops a replica (scale-down, redeploy)
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
