"""Waiting on a condition with a deadline, instead of a fixed sleep followed by an assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")
MAX_SHOWN = 4000  # characters of the last observed value in the failure message


def wait_until(
    observe: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    until: Callable[[T], bool] = bool,
    ignoring: tuple[type[BaseException], ...] = (),
    interval_s: float = 0.2,
) -> T:
    """Polls `observe()` until `until(value)` holds and returns that value. After `timeout_s` the test
    fails, naming `what` was awaited and the last value observed. An exception of a type in `ignoring`
    counts as "not yet" (its repr is the observed value); any other exception propagates, so `observe`
    may assert an invariant that must hold while waiting."""
    __tracebackhide__ = True  # reported at the test's line
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = observe()
            if until(value):
                return value
            last = value if isinstance(value, str) else repr(value)  # a log shown as it reads
        except ignoring as e:
            last = f"raised {e!r}"
        if time.monotonic() >= deadline:
            if len(last) > MAX_SHOWN:  # the tail: where a log or a timeline says what happened last
                last = "..." + last[-MAX_SHOWN:]
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}; last observed: {last}")
        time.sleep(interval_s)
