"""Validators for the Kubernetes manifests (k8s/), validated offline, and the gpu overlay's Serve config deployed for real.

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

import subprocess
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import jsonschema
import yaml
from pydantic import BaseModel

from tests.require import require, require_module

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
