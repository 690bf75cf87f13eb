"""The router half of an MoE model (the math): attention, gates, shared experts, norms, LM head, KV cache."""

from router.model.attention import Segment, Segments
from router.model.kv_cache import KVPool, PagedDecode, PagedSequenceCache, SequenceCache
from router.model.loader import load_router_model, parse_dtype
from router.model.transformer import RouterModel

__all__ = [
    "KVPool",
    "PagedDecode",
    "PagedSequenceCache",
    "RouterModel",
    "Segment",
    "Segments",
    "SequenceCache",
    "load_router_model",
    "parse_dtype",
]
