"""The shipped Kubernetes manifests (k8s/) pass every validator of tests/k8s/validators.py, offline."""

import jsonschema
import pytest

from tests.k8s.cross_checks import cross_errors
from tests.k8s.validators import (
    CRD_KINDS,
    OVERLAYS,
    builtin_errors,
    crd_errors,
    one,
    serve_config,
    serve_errors,
    to_json_schema,
)

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
