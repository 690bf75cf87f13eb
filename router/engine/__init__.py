"""The engines (in-process `Engine`, serving `AsyncEngine`), the scheduler and sampling: plain Python over
a RouterModel and a Dispatcher passed in."""

from router.engine.async_engine import AsyncEngine, EngineConfig
from router.engine.offline import Engine

__all__ = ["AsyncEngine", "Engine", "EngineConfig"]
