"""The serving engine in process as an API backend (the HTTP and gRPC API tests over a real model)."""

from __future__ import annotations

from emoe.api import ModelInfo
from emoe.tokenizer import Tokenizer
from router import Engine
from router.engine.async_engine import AsyncEngine, EngineConfig

MODEL = "demo-moe"


class EngineBackend:
    """The serving engine in process, as the HTTP app's backend."""

    def __init__(
        self,
        engine: Engine,
        tok: Tokenizer,
        config: EngineConfig | None = None,
        max_context: int = 256,
        max_tokens_limit: int = 64,
    ):
        self.engine, self.tok = engine, tok
        self.limits = (max_context, max_tokens_limit)
        self.requests: list = []  # every request seen (tests read the rendered prompts)
        self.ae = AsyncEngine(engine.spec, engine.model, engine.dispatcher, config or EngineConfig(), tok)

    def info(self) -> ModelInfo:
        spec = self.engine.spec
        return ModelInfo(MODEL, spec.family, self.tok.vocab_size, *self.limits, tuple(spec.eos_token_ids))

    def generate(self, request):
        self.requests.append(request)
        return self.ae.generate(request)

    async def cancel(self, request_id: str) -> None:
        await self.ae.cancel(request_id)
