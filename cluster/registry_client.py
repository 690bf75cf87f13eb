"""The router side of the registry: `RegistryClient`, the `router.dispatch.EndpointSource` a
RemoteDispatcher reads endpoints and the active placement from, kept fresh by a long-poll thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

from emoe.handles import call, call_in_thread

log = logging.getLogger(__name__)


class RegistryClient:
    """A router's view of the registry, kept fresh by a background long-poll thread."""

    def __init__(self, registry_handle: Any, poll_timeout_s: float = 2.0):
        self._registry = registry_handle
        self.version, self.entries = call_in_thread(registry_handle, "snapshot")
        self.placement_json: str | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._poll_timeout_s = poll_timeout_s
        self._thread = threading.Thread(target=self._poll, name="emoe-registry-client", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                version, entries, placement_json = call(
                    self._registry,
                    "wait_for_change",
                    self.version,
                    self._poll_timeout_s,
                    timeout_s=self._poll_timeout_s + 10,
                )
            except Exception as e:  # noqa: BLE001 - registry restarting: try again shortly
                log.warning("registry poll failed: %s", e)
                self._stop.wait(0.5)
                continue
            with self._cond:
                if version != self.version:
                    self.version, self.entries, self.placement_json = version, entries, placement_json
                    self._cond.notify_all()

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        with self._cond:
            return self.version, list(self.entries)

    def report_unreachable(self, replica_id: str) -> None:
        self._registry.report_unreachable.remote(replica_id)

    def active_placement(self) -> str | None:
        """JSON of the active placement as last seen (None before the first poll or without one)."""
        return self.placement_json

    def publish_load(self, router_id: str, loads: dict[int, list[float]]) -> None:
        self._registry.publish_load.remote(router_id, loads)

    def close(self) -> None:
        self._stop.set()
