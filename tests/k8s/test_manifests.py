"""The Kubernetes manifests (k8s/), validated offline, and the gpu overlay's Serve config deployed for real.

1. `kubectl kustomize` builds every overlay;
2. built-in kinds pass `kubernetes-validate --strict` (a kind without a schema is a failure);
3. RayService (and its rayClusterConfig as a RayCluster) validate against KubeRay's CRD schemas from
   ../shared/kuberay/crds/, turned into closed JSON Schemas so that a misspelled field is an error;
4. serveConfigV2 validates with Ray's own Serve schema, unknown keys rejected at every level; each
   autoscaling_config with AutoscalingConfig; the app args with cluster.config.parse_config;
5. cross-field checks (replica bounds, GPUs on the expert group, ports, placement, labels);
6. every validator fails on planted mistakes;
7. the gpu overlay's exact serveConfigV2 (tiny model and free ports swapped in) is deployed through Serve's
   config path (what `serve deploy` and KubeRay do) and answers a gRPC Generate.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import grpc
import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from tests.require import require, require_module
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("cpu-dev", "gpu")
CRD_DIR = ROOT.parent / "shared" / "kuberay" / "crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CRD_KINDS = {"RayService", "RayCluster", "PodMonitor", "ServiceMonitor"}
K8S_VERSION = "1.32.0"
PART_OF = {"app.kubernetes.io/part-of": "elastic-moe"}
HEAD_RESOURCE = "node:__internal_head__"


# --- building ------------------------------------------------------------------------------------------


def kustomize(overlay: str) -> list[dict]:
    kubectl = require(
        "kubectl",
        "`kubectl kustomize` builds the overlays",
        "kubectl with its built-in kustomize, https://kubernetes.io/docs/tasks/tools/ (the CI image has it)",
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: kustomize(name) for name in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def set_serve_config(rs: dict, cfg: dict) -> None:
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


# --- 2. built-in kinds ----------------------------------------------------------------------------------


def builtin_errors(doc: dict) -> list[str]:
    kubernetes_validate = require_module(
        "kubernetes_validate",
        "it validates the built-in kinds strictly",
        "the test extra: `pip install -e .[test]` (scripts/setup.sh does this)",
    )
    name = f"{doc['kind']}/{doc['metadata'].get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:  # the CLI's WARN: a failure here
        return [f"{name}: {e.message}"]
    return []


# --- 3. KubeRay CRDs as closed JSON Schemas ----------------------------------------------------------


def to_json_schema(s: dict) -> dict:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema: int-or-string, nullable, and objects
    closed (additionalProperties: false) unless x-kubernetes-preserve-unknown-fields."""
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: to_json_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = to_json_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [to_json_schema(v) for v in s[key]]
    if (
        s.get("type") == "object"
        and not s.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in s
    ):
        s["additionalProperties"] = False
    if s.pop("x-kubernetes-int-or-string", False):
        s["type"] = ["integer", "string"]
    if s.pop("nullable", False):
        if "type" in s:
            s["type"] = [*(s["type"] if isinstance(s["type"], list) else [s["type"]]), "null"]
        else:
            s = {"anyOf": [s, {"type": "null"}]}
    return s


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    path = CRD_DIR / CRD_FILES[kind]
    require(
        path,
        f"KubeRay's {kind} CRD is the schema the manifests are validated against",
        "KubeRay's CRDs under ../shared/kuberay/crds/ (see ../shared/kuberay/README.md)",
    )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 36k lines
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    # the root metadata is ObjectMeta, checked by the API server (not part of the CRD's schema)
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def crds() -> dict[str, jsonschema.Draft202012Validator]:
    return {kind: crd_validator(kind) for kind in CRD_FILES}


def crd_errors(doc: dict, crds: dict) -> list[str]:
    """The RayService, and its rayClusterConfig as a RayCluster, against KubeRay's v1 schemas."""
    objects = [doc]
    cluster_spec = doc.get("spec", {}).get("rayClusterConfig")
    if isinstance(cluster_spec, dict):
        objects.append(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": doc["metadata"],
                "spec": cluster_spec,
            }
        )
    errors = []
    for obj in objects:
        for e in crds[obj["kind"]].iter_errors(obj):
            errors.append(f"{obj['kind']}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    return errors


# --- 4. Ray Serve's own schema, strict --------------------------------------------------------------------


def unknown_keys(tp: Any, value: Any, path: str) -> list[str]:
    """Keys of `value` that pydantic type `tp` does not define, at every nesting level (Serve's schemas
    mostly ignore unknown keys, so a misspelled option would silently do nothing)."""
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if not isinstance(value, dict):
            return []
        fields = {f.alias or n: f for n, f in tp.model_fields.items()} | dict(tp.model_fields)
        out = []
        for key, v in value.items():
            if key not in fields:
                out.append(f"{path}{key}: unknown field of {tp.__name__}")
            else:
                out += unknown_keys(fields[key].annotation, v, f"{path}{key}.")
        return out
    if origin in (Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models and isinstance(value, dict):  # e.g. Union[Dict, AutoscalingConfig]: meant as the model
            return unknown_keys(models[0], value, path)
        return [e for a in args if a is not type(None) for e in unknown_keys(a, value, path)]
    if origin is list and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in unknown_keys(args[0], v, f"{path[:-1]}[{i}].")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [e for k, v in value.items() for e in unknown_keys(args[1], v, f"{path}{k}.")]
    if args and origin is not None and str(origin).endswith("Annotated"):
        return unknown_keys(args[0], value, path)
    return []


def serve_errors(rs: dict) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ConfigError, parse_config

    try:
        cfg = serve_config(rs)
    except yaml.YAMLError as e:
        return [f"serveConfigV2 is not YAML: {e}"]
    errors = unknown_keys(ServeDeploySchema, cfg, "serveConfigV2.")
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        errors.append(f"serveConfigV2: {e}")
    for app in cfg.get("applications") or []:
        try:
            parse_config(app.get("args") or {})
        except ConfigError as e:
            errors.append(f"args of {app.get('name')}: {e}")
        for dep in app.get("deployments") or []:
            if isinstance(dep.get("autoscaling_config"), dict):
                try:
                    AutoscalingConfig(**dep["autoscaling_config"])
                except (ValidationError, TypeError) as e:
                    errors.append(f"{dep.get('name')}.autoscaling_config: {e}")
    return errors


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


# --- tests: the shipped manifests pass ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_builds_every_kind(built, overlay):
    kinds = sorted(d["kind"] for d in built[overlay])
    assert kinds == ["NetworkPolicy", "PersistentVolumeClaim", "PodMonitor", "RayService"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_kubernetes_validation(built, overlay):
    docs = [d for d in built[overlay] if d["kind"] not in CRD_KINDS]
    assert docs
    assert [e for d in docs for e in builtin_errors(d)] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_matches_kuberay_crds(built, crds, overlay):
    assert crd_errors(one(built[overlay], "RayService"), crds) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_matches_ray_serve_schema(built, overlay):
    assert serve_errors(one(built[overlay], "RayService")) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cross_field_checks(built, overlay):
    assert cross_errors(built[overlay], overlay) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_listed_deployments_agree_with_build_app(built, overlay, tmp_path):
    """The deployments named in serveConfigV2 exist in the built app, and the expert groups'
    autoscaling_config is exactly what build_app derives from the args (so overriding it changes nothing)."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.config import AutoscalingConfig

    from cluster.app import build_app
    from emoe.demo import write_demo_model

    (app_cfg,) = serve_config(one(built[overlay], "RayService"))["applications"]
    args = {**app_cfg["args"], "model": str(write_demo_model(tmp_path / "demo"))}
    deployments = {d.name: d for d in build_serve_app(build_app(args), name=app_cfg["name"]).deployments}
    groups = app_cfg["args"]["groups"]
    assert set(deployments) == {
        "Frontend",
        "Router",
        "Registry",
        *(f"ExpertGroup-{g}" for g in range(groups)),
    }
    listed = {d["name"]: d for d in app_cfg["deployments"]}
    assert set(listed) <= set(deployments)
    for g in range(groups):
        built_cfg = deployments[f"ExpertGroup-{g}"]._deployment_config.autoscaling_config
        assert AutoscalingConfig(**listed[f"ExpertGroup-{g}"]["autoscaling_config"]) == built_cfg


def test_crd_translation_rules():
    closed = {"type": "object", "nullable": True, "properties": {"a": {"type": "integer"}}}
    schema = to_json_schema(
        {
            "type": "object",
            "properties": {
                "port": {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                },
                "name": {"type": "string", "nullable": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "closed": closed,
            },
        }
    )
    v = jsonschema.Draft202012Validator(schema)
    assert not list(v.iter_errors({"port": "http", "name": None, "free": {"any": 1}, "closed": None}))
    assert not list(v.iter_errors({"port": 8000, "closed": {"a": 1}}))
    for bad in ({"prot": 1}, {"closed": {"b": 1}}, {"port": 1.5}, {"name": 3}):
        assert list(v.iter_errors(bad)), bad


# --- tests: the validators catch planted mistakes ----------------------------------------------------------


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


def _experts(rs: dict) -> dict:
    return next(w for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if w["groupName"] == "experts")


def _edit_serve(rs: dict, edit) -> None:
    cfg = serve_config(rs)
    edit(cfg)
    set_serve_config(rs, cfg)


PLANTED = {
    "typo rayClusterConfg": (
        "crd",
        lambda rs: _rename(rs["spec"], "rayClusterConfig", "rayClusterConfg"),
        "rayClusterConfg",
    ),
    "typo in a pod template": (
        "crd",
        lambda rs: _rename(ray_container(_experts(rs)), "readinessProbe", "readynessProbe"),
        "readynessProbe",
    ),
    'minReplicas: "two"': (
        "crd",
        lambda rs: _experts(rs).update(minReplicas="two"),
        "'two' is not of type 'integer'",
    ),
    "rayStartParams value not a string": (
        "crd",
        lambda rs: _experts(rs)["rayStartParams"].update({"num-gpus": 1}),
        "1 is not of type 'string'",
    ),
    "GPU limit removed from the experts": (
        "cross",
        lambda rs: ray_container(_experts(rs))["resources"]["limits"].pop("nvidia.com/gpu"),
        "worker group experts: no nvidia.com/gpu limit",
    ),
    "toleration removed from the experts": (
        "cross",
        lambda rs: _experts(rs)["template"]["spec"].pop("tolerations"),
        "no toleration for nvidia.com/gpu",
    ),
    "minReplicas above maxReplicas": (
        "cross",
        lambda rs: _experts(rs).update(minReplicas=9),
        "minReplicas 9 > maxReplicas 8",
    ),
    "gRPC port not the serve service's": (
        "cross",
        lambda rs: _edit_serve(rs, lambda c: c["applications"][0]["args"].update(grpc_port=50052)),
        "serve service port serve-grpc",
    ),
    "HTTP port not the serve service's": (
        "cross",
        lambda rs: _edit_serve(rs, lambda c: c["http_options"].update(port=8080)),
        "serve service port serve:",
    ),
    "more routers than router pods": (
        "cross",
        lambda rs: _edit_serve(rs, lambda c: c["applications"][0]["args"].update(routers=5)),
        "5 routers x 1 CPUs exceed",
    ),
    "Frontend not pinned to the head": (
        "cross",
        lambda rs: _edit_serve(rs, lambda c: c["applications"][0]["deployments"].pop(0)),
        "Frontend must be pinned to the head",
    ),
    "Serve config typo proxy_locaton": (
        "serve",
        lambda rs: _edit_serve(rs, lambda c: _rename(c, "proxy_location", "proxy_locaton")),
        "proxy_locaton: unknown field",
    ),
    "autoscaling_config typo": (
        "serve",
        lambda rs: _edit_serve(
            rs,
            lambda c: _rename(
                c["applications"][0]["deployments"][2]["autoscaling_config"], "max_replicas", "max_replica"
            ),
        ),
        "max_replica: unknown field of AutoscalingConfig",
    ),
    "autoscaling min above max": (
        "serve",
        lambda rs: _edit_serve(
            rs, lambda c: c["applications"][0]["deployments"][2]["autoscaling_config"].update(min_replicas=5)
        ),
        "ExpertGroup-0.autoscaling_config",
    ),
    "app arg typo grpc_prot": (
        "serve",
        lambda rs: _edit_serve(rs, lambda c: c["applications"][0]["args"].update(grpc_prot=1)),
        "grpc_prot: Extra inputs are not permitted",
    ),
    "app arg wrong type": (
        "serve",
        lambda rs: _edit_serve(rs, lambda c: c["applications"][0]["args"].update(groups="four")),
        "groups:",
    ),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_validators_fail_on_planted_mistakes(built, crds, case):
    check, plant, expected = PLANTED[case]
    docs = copy.deepcopy(built["gpu"])
    rs = one(docs, "RayService")
    plant(rs)
    errors = {
        "crd": lambda: crd_errors(rs, crds),
        "serve": lambda: serve_errors(rs),
        "cross": lambda: cross_errors(docs, "gpu"),
    }[check]()
    assert any(expected in e for e in errors), errors


def test_strict_kubernetes_validation_fails_on_planted_mistakes(built):
    docs = copy.deepcopy(built["gpu"])
    policy = one(docs, "NetworkPolicy")
    _rename(policy["spec"], "policyTypes", "policyType")
    assert any("'policyType' was unexpected" in e for e in builtin_errors(policy))
    pvc = one(docs, "PersistentVolumeClaim")
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    assert builtin_errors(pvc)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("Couldn't find schema" in e for e in builtin_errors(unknown))


# --- 7. the gpu overlay's serveConfigV2 on a Ray cluster ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_serve_config_deploys_and_answers_grpc_generate(built, ray_cluster, tmp_path):
    """The exact serveConfigV2 of the gpu overlay (model path and ports swapped) goes through Serve's config
    path, as `serve deploy` / KubeRay: ServeDeploySchema, serve_start with its proxy and HTTP options, then
    deploy_apps (the builder runs in a Ray task, the listed options override). 4 groups x 1 GPU each = the
    session cluster's 4 logical GPUs; 2 routers x 1 CPU."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from emoe.client import InferenceClient
    from emoe.demo import write_demo_model

    cfg = serve_config(one(built["gpu"], "RayService"))
    (app,) = cfg["applications"]
    http_port, grpc_port = free_port(), free_port()
    cfg["http_options"].update(port=http_port, host="127.0.0.1")  # this machine: loopback only
    app["args"].update(
        model=str(write_demo_model(tmp_path / "model")),
        grpc_port=grpc_port,
        http_port=http_port,
        host="127.0.0.1",
        data_plane_host="127.0.0.1",
    )
    # on Kubernetes the head container gets these from the Secret emoe-api-tokens; here the app's runtime_env
    tokens = {app["args"]["api_token_env"]: "api-s3cret", app["args"]["admin_token_env"]: "adm1n"}
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(tokens)
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    try:
        client.deploy_apps(schema)
        wait_running(app["name"], timeout_s=120)
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout_s=60) as c:
            with pytest.raises(grpc.RpcError) as denied:
                c.complete("Once upon a time", max_tokens=2)
            assert (
                denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            )  # the token from the env is enforced
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout_s=60, token="api-s3cret") as c:
            parts = list(c.generate("Once upon a time", max_tokens=8, ignore_eos=True))
        assert len([t for p in parts for t in p.token_ids]) == 8
        assert parts[-1].finish_reason == "length"

        details = client.get_serve_details()["applications"][app["name"]]["deployments"]
        head = ray_cluster.head_node.node_id
        assert [r["node_id"] for r in details["Frontend"]["replicas"]] == [head]
        assert len(details["Router"]["replicas"]) == app["args"]["routers"]
        for g in range(app["args"]["groups"]):
            assert len(details[f"ExpertGroup-{g}"]["replicas"]) == 1
            deployed = details[f"ExpertGroup-{g}"]["deployment_config"]
            assert deployed["autoscaling_config"]["max_replicas"] == app["args"]["max_replicas_per_group"]
            assert deployed["ray_actor_options"]["num_gpus"] == app["args"]["gpus_per_expert_replica"]
    finally:
        serve.delete(app["name"])
        serve.shutdown()


def wait_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    def state() -> tuple[str, str]:
        status = serve.status().applications.get(app_name)
        state, message = (status.status, status.message) if status else ("NOT_STARTED", "")
        if state == "DEPLOY_FAILED":
            pytest.fail(f"application {app_name}: {state}: {message}")
        return state, message

    wait_until(
        state, timeout_s, f"application {app_name} RUNNING", until=lambda s: s[0] == "RUNNING", interval_s=0.5
    )
