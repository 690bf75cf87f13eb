"""Cross-field checks of the built manifests: replica bounds, GPUs on the expert groups, ports,
placement, labels (a check per function; `cross_errors` runs them all)."""

from __future__ import annotations

from tests.k8s.validators import HEAD_RESOURCE, PART_OF, one, serve_config

# --- 5. cross-field checks --------------------------------------------------------------------------------


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def container_ports(group: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in ray_container(group).get("ports", []) if "name" in p}


def quantity(resources: dict, kind: str, name: str) -> float:
    return float(str((resources.get(kind) or {}).get(name, 0)))


def cross_errors(docs: list[dict], overlay: str) -> list[str]:
    from cluster.config import parse_config

    rs = one(docs, "RayService")
    cfg = serve_config(rs)
    (app,) = cfg["applications"]
    ctx = {
        "docs": docs,
        "rs": rs,
        "cluster": rs["spec"]["rayClusterConfig"],
        "workers": rs["spec"]["rayClusterConfig"].get("workerGroupSpecs", []),
        "cfg": cfg,
        "args": parse_config(app["args"]),
        "deps": {d["name"]: d for d in app.get("deployments", [])},
        "overlay": overlay,
    }
    return [e for check in (_bounds, _ports, _placement, _gpus, _selection) for e in check(**ctx)]


def _bounds(cluster, workers, deps, **_) -> list[str]:
    """min <= replicas <= max for worker groups and autoscaling configs; the autoscaler and auth are on."""
    errors = []
    for w in workers:
        lo, hi, n = w["minReplicas"], w["maxReplicas"], w.get("replicas", w["minReplicas"])
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            errors.append(f"worker group {w['groupName']}: minReplicas {lo!r} > maxReplicas {hi!r}")
        elif not (isinstance(n, int) and lo <= n <= hi):
            errors.append(f"worker group {w['groupName']}: replicas {n!r} outside [{lo}, {hi}]")
    for name, d in deps.items():
        a = d.get("autoscaling_config")
        if a and not a["min_replicas"] <= a.get("initial_replicas", a["min_replicas"]) <= a["max_replicas"]:
            errors.append(f"{name}.autoscaling_config: min <= initial <= max violated")
    if not cluster.get("enableInTreeAutoscaling"):
        errors.append("rayClusterConfig.enableInTreeAutoscaling must be true")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        errors.append("rayClusterConfig.authOptions.mode must be token")
    return errors


def _ports(rs, cluster, workers, cfg, args, **_) -> list[str]:
    """Serve's HTTP port and the app's gRPC port are the serve service's ports, which target named ports that
    only the head declares; Serve's own gRPC proxy does not take the Frontend's port."""
    errors = []
    svc_ports = {p["name"]: p for p in rs["spec"]["serveService"]["spec"]["ports"]}
    head_ports = container_ports(cluster["headGroupSpec"])
    want = {"serve": cfg.get("http_options", {}).get("port", 8000), "serve-grpc": args.grpc_port}
    for name, port in want.items():
        sp = svc_ports.get(name)
        if sp is None or sp["port"] != port or head_ports.get(name) != port or sp.get("targetPort") != name:
            errors.append(f"serve service port {name}: want {port}, targetPort {name} = head port {name}")
    if svc_ports.get("serve-grpc", {}).get("appProtocol") != "kubernetes.io/h2c":
        errors.append("serve service port serve-grpc: appProtocol must be kubernetes.io/h2c")
    if args.http_port != want["serve"]:
        errors.append(f"args.http_port {args.http_port} != http_options.port {want['serve']}")
    grpc_options = cfg.get("grpc_options") or {}
    if grpc_options.get("grpc_servicer_functions") and grpc_options.get("port", 9000) == args.grpc_port:
        errors.append("grpc_options.port: Serve's gRPC proxy would take the Frontend's gRPC port")
    for w in workers:
        if set(container_ports(w)) & set(want):
            errors.append(f"worker group {w['groupName']}: declares a serve port (it runs no proxy)")
    if args.host != "0.0.0.0" or cfg.get("http_options", {}).get("host") != "0.0.0.0":
        errors.append("args.host and http_options.host must be 0.0.0.0 (reachable from outside the pod)")
    return errors


def _placement(workers, cfg, args, deps, **_) -> list[str]:
    """Proxy and Frontend on the head; the routers' CPU slots fit the worker groups."""
    errors = []
    if cfg.get("proxy_location") != "HeadOnly":
        errors.append("proxy_location must be HeadOnly (the serve service targets the head)")
    frontend = deps.get("Frontend", {}).get("ray_actor_options", {})
    if HEAD_RESOURCE not in frontend.get("resources", {}):
        errors.append(f"Frontend must be pinned to the head (resources {{{HEAD_RESOURCE!r}: 0.001}})")
    router_cpus = deps.get("Router", {}).get("ray_actor_options", {}).get("num_cpus", 0)
    slots = sum(w["maxReplicas"] * float(w["rayStartParams"].get("num-cpus", 0)) for w in workers)
    if args.routers * router_cpus > slots:
        errors.append(f"{args.routers} routers x {router_cpus} CPUs exceed the worker groups' {slots}")
    return errors


def _gpus(workers, args, overlay, **_) -> list[str]:
    """GPU worker groups carry limits and tolerations; the expert replicas' peak demand fits them."""
    errors = []
    gpu_groups = [w for w in workers if quantity(ray_container(w)["resources"], "limits", "nvidia.com/gpu")]
    gpus = args.gpus_per_expert_replica or 0
    if overlay == "gpu":
        if not any(w["groupName"] == "experts" for w in gpu_groups):
            errors.append("worker group experts: no nvidia.com/gpu limit")
        if gpus < 1:
            errors.append("args.gpus_per_expert_replica must be >= 1 in the gpu overlay")
    for w in gpu_groups:
        if not any(t.get("key") == "nvidia.com/gpu" for t in w["template"]["spec"].get("tolerations", [])):
            errors.append(f"worker group {w['groupName']}: no toleration for nvidia.com/gpu")
    capacity = sum(
        w["maxReplicas"] * quantity(ray_container(w)["resources"], "limits", "nvidia.com/gpu")
        for w in gpu_groups
    )
    per_group = args.max_replicas_per_group if args.autoscaling else args.replicas_per_group
    peak = min(args.gpu_budget or args.groups * per_group, args.groups * per_group)
    if gpus and peak * gpus > capacity:
        errors.append(f"expert replicas may need {peak * gpus:g} GPUs; GPU worker groups allow {capacity:g}")
    return errors


def _selection(docs, cluster, workers, **_) -> list[str]:
    """Every Ray pod carries the label the NetworkPolicy and the PodMonitor select, and mounts the model."""
    errors = []
    pvc = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    for g in [cluster["headGroupSpec"], *workers]:
        name = g.get("groupName", "head")
        labels = g["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in PART_OF.items()):
            errors.append(f"group {name}: pod label {PART_OF} missing")
        volumes = g["template"]["spec"].get("volumes", [])
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
        if claims != {pvc}:
            errors.append(f"group {name}: the model volume must be the claim {pvc}, got {sorted(claims)}")
    if one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] != PART_OF:
        errors.append("NetworkPolicy must select the Ray pods by their part-of label")
    monitor = one(docs, "PodMonitor")["spec"]
    ports = {e["port"] for e in monitor["podMetricsEndpoints"]}
    if monitor["selector"]["matchLabels"] != PART_OF or not {"metrics", "serve"} <= ports:
        errors.append("PodMonitor must scrape the Ray pods' metrics port and the head's serve port")
    return errors
