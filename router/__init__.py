"""The router half: attention, norms, gating, shared experts, LM head, KV cache, dispatchers, engine.

Nothing here imports Ray or gRPC except the thin deployment/server shells.
"""

from router.engine import Engine

__all__ = ["Engine"]
