"""Shared by the HTTP API tests: a fake backend (no Ray, no model), a uvicorn server in a thread, clients."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import uvicorn

from emoe.api import GenerateChunk, GenerateRequest, ModelInfo, Overloaded
from emoe.tokenizer import Tokenizer

MODEL = "demo-moe"
TOKEN = "s3cret-token"
MAX_CONTEXT, MAX_TOKENS_LIMIT = 64, 32
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


class FakeBackend:
    """Echoes: for prompt ids p it yields p[-1]+1, p[-1]+2, ... (mod vocab), one token per chunk.

    Markers in the prompt text pick a behaviour: OVERLOAD raises Overloaded, BOOM an unexpected error,
    LATEBOOM an unexpected error after the first chunk, SLOW sleeps 50 ms before each chunk."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    def info(self) -> ModelInfo:
        return ModelInfo(MODEL, "minimax_m2", self.tok.vocab_size, MAX_CONTEXT, MAX_TOKENS_LIMIT, (0,))

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        if "OVERLOAD" in request.prompt_text:
            raise Overloaded("queue full, retry later")
        if request.prompt_text.startswith("BOOM"):
            raise RuntimeError("secret internal detail")
        n, prompt = request.sampling.max_tokens, request.prompt_token_ids
        for i, t in enumerate(echo_ids(prompt, n, self.tok.vocab_size), 1):
            if "SLOW" in request.prompt_text:
                await asyncio.sleep(0.05)
            if "LATEBOOM" in request.prompt_text and i == 2:
                raise RuntimeError("secret internal detail")
            finish = "length" if i == n else None
            yield GenerateChunk(request.request_id, [t], self.tok.decode([t]), finish, len(prompt), i)
        self.completed.append(request.request_id)

    async def cancel(self, request_id: str) -> None:
        await asyncio.sleep(0.01)  # a real suspension: the frontend must shield it from its own cancellation
        self.cancelled.append(request_id)


def echo_ids(prompt: tuple[int, ...] | list[int], n: int, vocab: int) -> list[int]:
    return [(prompt[-1] + i) % vocab for i in range(1, n + 1)]


class Server:
    """A uvicorn server for `app` on 127.0.0.1, on a free port, in a daemon thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def client(base: str, key: str = "x"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=10)


def expected_text(tok: Tokenizer, prompt_ids: list[int], n: int) -> str:
    return "".join(tok.decode([t]) for t in echo_ids(prompt_ids, n, tok.vocab_size))


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_still_serving(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
