"""Dispatchers: the data-plane client of an MoE layer (local, or remote over gRPC / torch.distributed).

`get_dispatcher(name)` picks a factory once: "local" is built in; remote ones are plugins found under the
`emoe.dispatchers` entry-point group (the cluster layer registers "grpc" and "dist", because starting or
attaching expert groups is its job, not the router's).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from router.dispatch.base import (
    DispatchContext,
    Dispatcher,
    DispatchError,
    EndpointSource,
    TransportError,
    split_by_group,
)
from router.dispatch.local import LocalDispatcher
from router.dispatch.remote import RemoteDispatcher, Transport

ENTRY_POINT_GROUP = "emoe.dispatchers"
Factory = Callable[[DispatchContext], Dispatcher]


def get_dispatcher(name: str) -> Factory:
    if name == "local":
        return LocalDispatcher.from_context
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in plugins:
        choices = ", ".join(sorted({"local", *plugins}))
        raise ValueError(f"unknown dispatcher {name!r}; choices: {choices}")
    return plugins[name].load()


__all__ = [
    "DispatchContext",
    "DispatchError",
    "Dispatcher",
    "EndpointSource",
    "LocalDispatcher",
    "RemoteDispatcher",
    "Transport",
    "TransportError",
    "get_dispatcher",
    "split_by_group",
]
