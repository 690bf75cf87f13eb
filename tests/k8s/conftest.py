"""Fixtures: the built overlays and the KubeRay CRD validators."""

import jsonschema
import pytest

from tests.k8s.validators import CRD_FILES, OVERLAYS, crd_validator, kustomize


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: kustomize(name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def crds() -> dict[str, jsonschema.Draft202012Validator]:
    return {kind: crd_validator(kind) for kind in CRD_FILES}
