"""The router half: engine/ (engines, scheduler, sampling), model/ (the dense math and KV cache), dispatch/
(how an MoE layer's tokens reach the expert groups). It never imports Ray or the cluster layer; only
dispatch/ speaks gRPC and torch.distributed."""

from router.engine import Engine

__all__ = ["Engine"]
