"""Tokenizer endpoints as vLLM serves them: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`,
`GET /version` (what lm-eval and benchmark tools read). Errors come back in the OpenAI error shape through
the app's handlers (`cluster/http_api.py`): a bad body is a 400 naming the field.

- `/tokenize` takes `prompt` (text) or `messages` (rendered with the chat template, `add_generation_prompt`)
  and answers `{"count", "max_model_len", "tokens"}`. No special tokens are added to a text prompt.
- `/detokenize` takes `tokens` (ids in [0, vocab_size)) and answers `{"prompt"}`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictInt

from cluster.openai_agent import template_messages
from cluster.openai_schema import ChatMessage
from emoe import __version__
from emoe.api import InvalidRequest, ModelInfo
from emoe.tokenizer import Tokenizer


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # accepted as vLLM does; this tokenizer adds none to a prompt


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[StrictInt]


def add_tokenizer_routes(
    app: FastAPI, tokenizer: Tokenizer, info: Callable[[], ModelInfo], model_name: str
) -> None:
    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise InvalidRequest("model", f"{model[:200]!r} is not served here (serving {model_name!r})")

    async def tokenize(body: TokenizeBody) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("prompt", "give exactly one of prompt and messages")
        if body.messages is not None:
            messages = template_messages(body.messages)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            text = body.prompt
        ids = tokenizer.encode(text)
        return {"count": len(ids), "max_model_len": info().max_context, "tokens": ids}

    async def detokenize(body: DetokenizeBody) -> dict:
        check_model(body.model)
        vocab = info().vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest("tokens", f"ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return {"prompt": tokenizer.decode(body.tokens)}

    async def tokenizer_info() -> dict:
        m = info()
        return {
            "model": model_name,
            "vocab_size": m.vocab_size,
            "max_model_len": m.max_context,
            "eos_token_ids": list(m.eos_token_ids),
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "chat_template": tokenizer.chat_template,
        }

    async def version() -> dict:
        return {"version": __version__}

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
