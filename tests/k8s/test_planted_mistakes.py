"""Every validator of tests/k8s/validators.py fails on a planted mistake."""

import copy

import pytest

from tests.k8s.cross_checks import cross_errors, ray_container
from tests.k8s.validators import builtin_errors, crd_errors, one, serve_config, serve_errors, set_serve_config

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
