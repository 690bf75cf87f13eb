"""What a test needs from its environment: programs (kubectl, chromium, promtool), data (the KubeRay CRDs
under ../shared), optional Python packages (the test extra).

Missing under CI=true, the test fails, so that a dropped install step cannot hide behind a skip; missing
locally, it skips. Both say why the thing is needed and how to install it.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str, why: str, install_hint: str) -> NoReturn:
    """Fails (CI=true) or skips (otherwise) the running test."""
    __tracebackhide__ = True  # reported at the test's line
    message = f"{what} is missing: {why}. Install: {install_hint}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing requirement is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def require(need: str | Path, why: str, install_hint: str) -> str:
    """`need` is a program looked up on PATH (a str) or a file or folder (a Path); returns its path."""
    __tracebackhide__ = True
    if isinstance(need, Path):
        if not need.exists():
            missing(str(need), why, install_hint)
        return str(need)
    found = shutil.which(need)
    if found is None:
        missing(f"`{need}` (not on PATH)", why, install_hint)
    return found


def require_module(name: str, why: str, install_hint: str) -> ModuleType:
    """The imported module `name`; for optional Python packages, with the same CI rule."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", why, install_hint)
