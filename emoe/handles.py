"""Blocking calls on a Ray actor handle or a Serve deployment handle, whichever the caller was given."""

from __future__ import annotations

import threading
from typing import Any


def call(handle: Any, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
    """Calls `method` on a Ray actor handle or a Serve deployment handle and waits for the result.

    Must not run on an event-loop thread (a Serve handle refuses to block there)."""
    ref = getattr(handle, method).remote(*args)
    if hasattr(ref, "result"):  # serve DeploymentResponse
        return ref.result(timeout_s=timeout_s)
    import ray

    return ray.get(ref, timeout=timeout_s)


def call_in_thread(handle: Any, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
    """`call` from a helper thread, for callers that may be on an event loop (Serve constructors)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call(handle, method, *args, timeout_s=timeout_s)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"emoe-registry-{method}", daemon=True)
    t.start()
    t.join(timeout_s + 5)
    if "error" in box:
        raise box["error"]
    return box.get("value")
