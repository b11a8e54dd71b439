"""Settings of the inference gateway process."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8001, description="Port the gateway listens on.")
    vllm_urls: str = Field(
        default="",
        description="Comma-separated base URLs of the vLLM replicas (http://host:port). Each "
        "replica's served base model is discovered from its /v1/models.",
    )
    vllm_api_key: str = Field(
        default="", description="Bearer token the replicas expect (vLLM's --api-key), if any."
    )
    replica_max_adapters: int = Field(
        default=4,
        description="Adapters kept registered on one replica; the coldest is unloaded beyond "
        "this. Keep it at or below the replica's --max-cpu-loras.",
    )
    adapter_cache_dir: Path | None = Field(
        default=None,
        description="Local folder of downloaded adapters (default DATA_DIR/adapter-cache). "
        "The replicas must read it at the same path (same host or a shared volume).",
    )
    adapter_cache_bytes: int = Field(
        default=20 * 1024**3,
        description="Bytes of adapters kept in the local cache; least recently used beyond this.",
    )
    health_interval_seconds: float = Field(
        default=2.0, description="How often each replica is health-checked."
    )
    retired_poll_seconds: float = Field(
        default=2.0,
        description="How often retired models (to unload them everywhere and answer 404) and "
        "changed base models are looked for.",
    )
    upstream_timeout_seconds: float = Field(
        default=600.0, description="Longest wait for a replica's answer (or next stream chunk)."
    )
    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, description="Largest chat/completions request body, in bytes."
    )
    max_tokens_limit: int = Field(
        default=16_384,
        description="Largest max_tokens (max_completion_tokens) accepted; also what a request "
        "that sets none is capped at.",
    )
    max_choices: int = Field(
        default=16, description="Largest n (and best_of): choices generated for one request."
    )
    auth_cache_seconds: float = Field(
        default=0.5,
        description="How often the gateway looks for revoked keys and disabled tenants (a revoked "
        "key is refused within about twice this); also how long a key is remembered while "
        "that watch is not reporting.",
    )
    model_cache_seconds: float = Field(
        default=1.0,
        description="How long a (tenant, model) resolution is remembered while the model watch "
        "(RETIRED_POLL_SECONDS) is not reporting; while it reports, a retired or deleted model "
        "answers 404 within one poll.",
    )
    rate_limit_redis_url: str = Field(
        default="",
        description="Redis for the per-tenant token buckets (shared by every gateway "
        "process). Empty: the broker URL when it is redis://, else in-process buckets.",
    )
    usage_flush_seconds: float = Field(
        default=5.0, description="How often aggregated token usage is written to the database."
    )

    @model_validator(mode="after")
    def _fill_gateway_defaults(self) -> GatewaySettings:
        if self.adapter_cache_dir is None:
            self.adapter_cache_dir = self.data_dir / "adapter-cache"
        if not self.rate_limit_redis_url and self.broker_url.startswith(("redis://", "rediss://")):
            self.rate_limit_redis_url = self.broker_url
        return self

    @property
    def replica_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.vllm_urls.split(",") if u.strip()]

    @property
    def cache_dir(self) -> Path:
        assert self.adapter_cache_dir is not None
        return self.adapter_cache_dir
