"""The serving engine in process as an API backend (the HTTP and gRPC API tests over a real model)."""

from __future__ import annotations

from emoe.api import ModelInfo
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig

MODEL = "demo-moe"


class EngineBackend:
    """The serving engine in process, as the HTTP app's backend."""

    def __init__(self, engine: Engine, tok: Tokenizer, config: EngineConfig | None = None):
        self.engine, self.tok = engine, tok
        self.ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, config or EngineConfig(), tok)

    def info(self) -> ModelInfo:
        spec = self.engine.spec
        return ModelInfo(MODEL, "minimax_m2", self.tok.vocab_size, 256, 64, tuple(spec.eos_token_ids))

    def generate(self, request):
        return self.ae.generate(request)

    async def cancel(self, request_id: str) -> None:
        await self.ae.cancel(request_id)
