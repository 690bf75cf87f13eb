"""AppConfig: the one configuration of a served application (YAML file, CLI flags or Serve builder args).

An invalid value is an error naming the field (`ConfigError`, from pydantic's validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

DEFAULT_MODEL_DIR = Path(".emoe/demo-model")


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid configuration; the message names each offending field."""


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(str(DEFAULT_MODEL_DIR), description="checkpoint directory (config.json + safetensors)")
    model_name: str | None = Field(None, description="name served in the APIs (default: the directory name)")
    groups: int = Field(2, ge=1, description="expert groups (one Serve deployment each)")
    replicas_per_group: int = Field(1, ge=1, description="initial replicas of each expert group")
    routers: int = Field(1, ge=1, description="router replicas")
    transport: Literal["grpc", "dist", "local"] = Field("grpc", description="router -> expert data plane")
    dtype: Literal["float32", "bfloat16"] = "float32"
    host: str = Field("127.0.0.1", description="address the gRPC and HTTP servers bind")
    data_plane_host: str = Field(
        "127.0.0.1",
        description="address expert replicas bind and advertise; 'node': all interfaces, advertising the "
        "Ray node's IP (multi-node clusters)",
    )
    grpc_port: int = Field(50051, ge=0, le=65535, description="public gRPC API port (0: OS picks)")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI HTTP API and dashboard port")
    gpus_per_expert_replica: float | None = Field(
        None, ge=0, description="default: 1 if the cluster has GPUs"
    )
    kv_blocks: int = Field(2048, ge=1, description="KV cache blocks per router replica")
    block_size: int = Field(16, ge=1, le=1024)
    max_batch_tokens: int = Field(512, ge=1, description="token budget of one engine step")
    max_num_seqs: int = Field(64, ge=1, description="sequences in one engine step")
    micro_batches: int = Field(
        1,
        ge=1,
        le=2,
        description="2: ping-pong, a step as two micro-batches so one's attention overlaps the other's expert "
        "calls (pays where the experts have their own GPUs or hosts; costs a second read of expert weights)",
    )
    max_queue: int = Field(256, ge=0, description="waiting requests per router before RESOURCE_EXHAUSTED")
    prefix_caching: bool = Field(
        True,
        description="automatic prefix caching: full KV blocks of earlier prompts are reused by requests that "
        "start with the same tokens (false: every prompt is computed in full)",
    )
    prefix_aware_routing: bool = Field(
        True,
        description="with several routers: send a request to the router that served its prompt's prefix "
        "(its KV blocks are cached there) unless that router is prefix_routing_imbalance requests busier than "
        "the least loaded (false: Serve's default, power of two choices)",
    )
    prefix_routing_imbalance: int = Field(
        4, ge=0, description="requests a router may be above the least loaded and still get its prefixes"
    )
    tool_call_parser: str = Field(
        "auto",
        description="tool-call format of the chat API: auto (the model family's), minimax_m2, hermes, deepseek_v3, "
        "glm4_moe, kimi_k2",
    )
    reasoning_parser: str = Field(
        "auto", description="reasoning split of the chat API: auto (the model family's), think, none"
    )
    grammar_timeout_s: float = Field(
        10.0, gt=0, description="a structured-output schema / regex / grammar compiling longer is a 400"
    )
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    generation_config: Literal["auto", "ignore"] = Field(
        "auto",
        description="auto: the checkpoint's generation_config.json sampling defaults (temperature, top_p, "
        "top_k) apply where a request leaves them unset, as vLLM does; ignore: the APIs' own defaults",
    )
    max_context: int | None = Field(None, ge=2, description="prompt + output limit (default: the model's)")
    api_token: SecretStr | None = Field(None, description="bearer token required by the public APIs")
    admin_token: SecretStr | None = Field(None, description="token required by admin actions")
    api_token_env: str | None = Field(
        None, description="environment variable holding api_token (read by the Frontend)"
    )
    admin_token_env: str | None = Field(None, description="environment variable holding admin_token")
    tls_cert_file: str | None = Field(None, description="PEM certificate for the gRPC API")
    tls_key_file: str | None = Field(None, description="PEM private key for the gRPC API")
    autoscaling: bool = Field(
        False, description="scale expert groups by routed tokens/s (cluster/autoscale.py)"
    )
    min_replicas_per_group: int = Field(1, ge=1)
    max_replicas_per_group: int = Field(4, ge=1)
    target_tokens_per_s: float = Field(
        200.0, gt=0, description="routed tokens/s one expert replica should take"
    )
    gpu_budget: int | None = Field(None, ge=1, description="expert replicas of all groups together")
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(20.0, ge=0)
    metrics_push_interval_s: float = Field(1.0, gt=0, description="how often replicas report load to Serve")
    replace_imbalance_threshold: float | None = Field(
        None, gt=1, description="re-place hot experts when max/mean group load stays above this (None: off)"
    )
    replace_after_s: float = Field(10.0, ge=0, description="how long the imbalance must last first")
    router_torch_threads: int = Field(0, ge=0, description="torch threads in a router (0: torch default)")
    expert_torch_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.min_replicas_per_group > self.max_replicas_per_group:
            raise ValueError("min_replicas_per_group must be <= max_replicas_per_group")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name

    def engine_config(self, model_max_context: int):
        """The router's `EngineConfig`: context = the configured limit (else the model's: its
        max_position_embeddings, times its RoPE factor where that extends it), within the KV pool."""
        from router.engine import EngineConfig

        if self.max_context and self.max_context > model_max_context:
            log.warning(
                "max_context=%d is beyond the %d positions the model is trained for; quality past them is "
                "not guaranteed",
                self.max_context,
                model_max_context,
            )
        max_context = min(self.max_context or model_max_context, self.kv_blocks * self.block_size)
        return EngineConfig(
            kv_blocks=self.kv_blocks,
            block_size=self.block_size,
            max_batch_tokens=self.max_batch_tokens,
            max_num_seqs=self.max_num_seqs,
            micro_batches=self.micro_batches,
            max_queue=self.max_queue,
            max_context=max_context,
            grammar_timeout_s=self.grammar_timeout_s,
            prefix_caching=self.prefix_caching,
        )

    def to_args(self) -> dict[str, Any]:
        """Plain dict (secrets revealed) for Serve builder args and deployment constructors."""
        out = self.model_dump()
        for k in ("api_token", "admin_token"):
            out[k] = out[k].get_secret_value() if out[k] is not None else None
        return out


def load_config(file: str | Path | None = None, **overrides: Any) -> AppConfig:
    """YAML file (optional) then overrides (CLI flags; None values ignored) -> AppConfig."""
    data: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {file}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: expected a mapping of fields")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from e
