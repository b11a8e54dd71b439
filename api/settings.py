"""Settings of the control-plane API process."""

from __future__ import annotations

from pydantic import Field

from common.settings import CommonSettings


class APISettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, description="Port the API listens on.")
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Comma-separated addresses (or '*') whose X-Forwarded-For and "
        "X-Forwarded-Proto the API believes: the proxy in front of it. The dashboard's login "
        "throttle counts failures per client address and its cookies take the Secure flag "
        "from the scheme, so behind a proxy name it here; '*' only where nothing but that "
        "proxy reaches the API and the proxy sets X-Forwarded-For itself instead of "
        "appending to the client's.",
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024,
        description="Largest dataset file accepted by POST /v1/files, in bytes.",
    )
    max_line_bytes: int = Field(
        default=1024 * 1024, description="Longest line (one JSONL example) accepted, in bytes."
    )
    min_examples: int = Field(default=10, description="Fewest examples a dataset file may hold.")
    max_examples: int = Field(
        default=1_000_000, description="Most examples a dataset file may hold."
    )
    max_json_body_bytes: int = Field(
        default=1024 * 1024, description="Largest JSON request body accepted, in bytes."
    )
    dispatcher_enabled: bool = Field(
        default=True,
        description="Run the outbox dispatcher inside the API process (publishes queued work "
        "to the broker). Turn off to leave publishing to the workers, which run one too.",
    )
    dispatcher_poll_seconds: float = Field(
        default=1.0, description="How often the dispatcher looks for unpublished outbox rows."
    )
    cuda_workers: bool = Field(
        default=False,
        description="Whether CUDA training workers exist; jobs asking for 4-bit/8-bit "
        "quantization are refused at creation when they don't.",
    )
    max_lora_rank: int = Field(
        default=16,
        ge=1,
        description="Largest lora_rank a job may ask for: the serving fleet's vLLM "
        "--max-lora-rank (an adapter above it trains but could never be loaded). "
        "`loraplex up` and `loraplex vllm` start vLLM with it.",
    )
    job_max_attempts: int = Field(
        default=3,
        description="Failed attempts (a crash, a lost worker, an error) a job may have before it "
        "fails for good; pausing and resuming do not count.",
    )
    db_pool_size: int = Field(
        default=20,
        description="Database connections kept open. The pool may grow to twice this plus "
        "the request thread pool, so a request holding a connection never waits for one.",
    )
    auth_cache_seconds: float = Field(
        default=0.5,
        description="How long a verified API key is remembered in-process (revocation takes "
        "effect within this time; DESIGN asks for at most 1 s).",
    )
