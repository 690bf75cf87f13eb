"""The Frontend deployment (ingress): the OpenAI HTTP app and the gRPC Inference API over `RouterBackend`,
which streams from the Router deployment and resumes a stream on another router when its router dies.
Tokens and TLS material are read here, in the replica."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from cluster.config import AppConfig, parse_config
from cluster.errors import Unauthenticated, add_error_observer
from cluster.grpc_api import InferenceServicer
from cluster.grpc_server import start_grpc_server
from cluster.http_api import build_http_app
from cluster.ops import OpsState
from cluster.ops_http import add_ops_routes
from emoe.api import GenerateChunk, GenerateRequest, InvalidRequest, ModelInfo, Overloaded
from emoe.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RouterBackend:
    """`InferenceBackend` over the Router deployment's handle (streaming calls, cancel by closing).

    Resumption, in steps, when the router serving a stream dies: 1. keep every token already sent;
    2. send a new request to another router with prompt + those tokens, the remaining max_tokens and the
    same seed (`resume_offset` keeps sampling reproducible and the engine's usage that of the original);
    3. go on streaming under the original request_id, so the client sees no error, no duplicated and no
    missing token."""

    MAX_RESUMES = 3

    def __init__(self, router: Any, info: ModelInfo):
        self.router, self._info = router, info
        self._live: dict[str, Any] = {}
        self.resumed = 0

    def info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        sent: list[int] = []
        req, attempt = request, 0
        while True:
            try:
                async for chunk in self._stream(req):
                    sent.extend(chunk.token_ids)
                    chunk.request_id = request.request_id
                    yield chunk
                return
            except RayActorError as e:
                if attempt >= self.MAX_RESUMES or len(sent) >= request.sampling.max_tokens:
                    raise
                attempt += 1
                self.resumed += 1
                log.warning(
                    "router died during %s (%s): resuming after %d tokens", request.request_id, e, len(sent)
                )
                req = _resumed(request, sent, attempt)

    async def _stream(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        gen = self.router.options(stream=True).generate.remote(request)
        self._live[request.request_id] = gen
        finished = False
        try:
            async for chunk in gen:
                finished = bool(chunk.finish_reason)
                yield chunk
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, InvalidRequest | Overloaded):  # the client's error (e.g. a bad grammar)
                raise cause from None
            raise
        finally:
            self._live.pop(request.request_id, None)
            if not finished:  # the consumer went away: stop the router's generation (frees its KV blocks)
                gen.cancel()

    async def cancel(self, request_id: str) -> None:
        for rid in [
            r for r in self._live if r == request_id or r.startswith((request_id + "~", request_id + "/"))
        ]:
            gen = self._live.pop(rid, None)
            if gen is not None:
                gen.cancel()


def _resumed(request: GenerateRequest, sent: list[int], attempt: int) -> GenerateRequest:
    s = request.sampling
    return GenerateRequest(
        request_id=f"{request.request_id}~{attempt}",
        prompt_token_ids=tuple(request.prompt_token_ids) + tuple(sent),
        # the prompt logprobs went out with the first chunk; the resumed stream does not repeat them
        sampling=dataclasses.replace(s, max_tokens=s.max_tokens - len(sent), prompt_logprobs=None),
        prompt_text=request.prompt_text,
        resume_offset=request.resume_offset + len(sent),
    )


@serve.ingress()
class Frontend:
    async def __init__(self, config: dict[str, Any], router: Any, registry: Any = None):
        self.cfg: AppConfig = _with_env_tokens(parse_config(config))
        self.tokenizer = Tokenizer(self.cfg.model)
        self.router, self.registry = router, registry
        info = await router.info.remote()
        self.backend = RouterBackend(router, info)
        tls_cert, tls_key = _read_tls(self.cfg)
        self.grpc_server, self.grpc_port = await start_grpc_server(
            InferenceServicer(
                self.backend,
                self.tokenizer,
                tool_call_parser=self.cfg.tool_call_parser,
                reasoning_parser=self.cfg.reasoning_parser,
            ),
            self.cfg.host,
            self.cfg.grpc_port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            api_token=_secret(self.cfg.api_token),
        )
        log.info("gRPC Inference API on %s:%d", self.cfg.host, self.grpc_port)
        self.ops = OpsState(router, registry, serve.get_replica_context().app_name, self.cfg.groups)
        self.ops.start()
        add_error_observer(self.ops.count_rejected)

    def __serve_build_asgi_app__(self):
        app = build_http_app(
            self.backend,
            self.tokenizer,
            model_name=self.cfg.served_name,
            api_token=_secret(self.cfg.api_token),
            on_ignored=self.ops.count_ignored,
            tool_call_parser=self.cfg.tool_call_parser,
            reasoning_parser=self.cfg.reasoning_parser,
        )
        add_ops_routes(app, self.ops, self.registry, _secret(self.cfg.admin_token))
        return app

    async def addresses(self) -> dict[str, Any]:
        return {"grpc_port": self.grpc_port, "host": self.cfg.host}

    async def frontend_stats(self) -> dict[str, Any]:
        return {"resumed_streams": self.backend.resumed, "rejected": dict(self.ops.rejected)}

    async def ops_state(self) -> dict:
        return self.ops.state()

    async def router_stats(self) -> dict:
        return await self.router.stats.remote()

    async def load_report(self) -> dict:
        return await self.registry.load_report.remote()

    async def placement_state(self) -> dict:
        return await self.registry.placement_state.remote()

    async def admin_replace(self, admin_token: str | None = None) -> dict:
        """Admin action: re-place hot experts now (requires the admin token when one is configured)."""
        want = _secret(self.cfg.admin_token)
        if want is not None and not hmac.compare_digest((admin_token or "").encode(), want.encode()):
            raise Unauthenticated("admin token missing or wrong")
        return await self.registry.replace.remote()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def _with_env_tokens(cfg: AppConfig) -> AppConfig:
    """Tokens named by `api_token_env` / `admin_token_env`, read here in the replica (so they never sit
    in Serve's stored config); a named variable that is unset is an error naming it."""
    update = {}
    for field, env in (("api_token", cfg.api_token_env), ("admin_token", cfg.admin_token_env)):
        if env:
            value = os.environ.get(env)
            if not value:
                raise ValueError(f"{field}_env: environment variable {env!r} is not set")
            update[field] = SecretStr(value)
    return cfg.model_copy(update=update) if update else cfg


def _read_tls(cfg: AppConfig) -> tuple[bytes | None, bytes | None]:
    if not cfg.tls_cert_file:
        return None, None
    return Path(cfg.tls_cert_file).read_bytes(), Path(cfg.tls_key_file).read_bytes()
