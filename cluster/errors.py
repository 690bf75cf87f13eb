"""The one place where errors become gRPC status codes and HTTP statuses."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from emoe.api import InvalidRequest, Overloaded, UnknownRequest


class Unauthenticated(PermissionError):
    """Missing or wrong API / admin token."""


# exception type -> (gRPC status, HTTP status, OpenAI error type)
ERROR_MAP: list[tuple[type[BaseException], grpc.StatusCode, int, str]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded"),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    (UnknownRequest, grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
]


_observers: list[Callable[[str], None]] = []


def add_error_observer(fn: Callable[[str], None]) -> None:
    """`fn(reason)` is called for every classified error (reason: the gRPC status name, lower case);
    the Frontend counts rejected requests by reason with it."""
    _observers.append(fn)


def classify(exc: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """(gRPC status, HTTP status, error type) for an exception; anything unexpected is INTERNAL / 500."""
    result = (grpc.StatusCode.INTERNAL, 500, "server_error")
    for cls, code, http, kind in ERROR_MAP:
        if isinstance(exc, cls):
            result = (code, http, kind)
            break
    for fn in _observers:
        fn(result[0].name.lower())
    return result


def client_message(exc: BaseException) -> str:
    """The text a client sees for an expected error: `str(exc)`, but a KeyError's own message unquoted."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
