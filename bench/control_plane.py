"""Control plane: job creation at a fixed rate, loraplex against a floor (DESIGN §11).

Quality bar: ``POST /v1/fine_tuning/jobs`` p99 <= 50 ms at 100 requests/s for 30 s on Postgres,
with zero 5xx. This script is stricter: any non-2xx answer or failed request is an error.

The load is open-loop: request ``i`` is *scheduled* at ``start + i / rate`` whatever the server
is doing, and its latency runs from that scheduled instant to the end of the response. A slow
response therefore delays nobody's send, and any queueing (in the client, the kernel or the
server) shows up in the latency instead of lowering the rate. The client is a few lines of
asyncio over keep-alive HTTP/1.1 connections (at most 256; a request that finds them all busy
waits, and that wait counts); a request with no answer after 10 s is an error. Latency
percentiles are over the successful (2xx) responses.

Two servers are measured one after the other, in the same run, on the same machine and database
server, each with uvicorn's defaults (one worker, uvloop, httptools):

* ``floor``: a bare Starlette app (below) that does the minimum a job create must do: parse
  the JSON body, compare the bearer token with a constant, INSERT one row shaped like
  ``fine_tuning_jobs`` into Postgres through a small connection pool, and return the row.
* ``loraplex``: the real API (``loraplex api``) on a fresh database migrated with
  ``loraplex migrate``; every create writes the job, an event, an outbox row and an audit row
  in one transaction, and the in-process dispatcher publishes the outbox row to Redis.

The script creates a database ``loraplex_bench_<random>`` and drops it at the end (also on
Ctrl-C, SIGTERM or failure). Besides latency it reports each server's CPU time per request and
how busy the whole machine was, because a shared machine makes every number here noisy. Run it
from the repository root (results and their reading: docs/benchmarks.md):

    .venv/bin/python bench/control_plane.py [--rate 100] [--duration 30] [--warmup 3]
        [--json PATH] [--targets floor,loraplex] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
TARGET_P99_MS = 50.0
REQUEST_TIMEOUT_S = 10.0
# Keep-alive connections the load generator may hold open. A request that finds them all busy
# waits its turn in the client, and that wait counts in its latency.
MAX_CONNECTIONS = 256
# Connections each server keeps to Postgres: loraplex's engine pool_size (models_db/session.py).
POOL_SIZE = 10
FLOOR_TOKEN = "floor_" + "x" * 40  # compared in constant time, like an API key
FLOOR_TENANT = "org-bench"
DEDUP_KEY_PATTERN = "loraplex:published:outbox-*"
KOMBU_PRIORITY_SEP = b"\x06\x16"  # kombu's Redis priority queues are QUEUE + this + step

# The method loraplex stores for a job created without one (its supervised defaults).
DEFAULT_METHOD = {
    "type": "supervised",
    "supervised": {
        "hyperparameters": {
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
            "n_epochs": "auto",
            "lora_rank": "auto",
            "lora_alpha": "auto",
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
            "use_dora": False,
            "quantization": "none",
            "max_seq_len": "auto",
            "packing": True,
        }
    },
}

FLOOR_TABLE = """
CREATE TABLE bench_jobs (
    id varchar(40) PRIMARY KEY,
    tenant_id varchar(40) NOT NULL,
    model varchar(400) NOT NULL,
    training_file varchar(64) NOT NULL,
    status varchar(20) NOT NULL,
    method jsonb NOT NULL,
    metadata jsonb,
    created_at bigint NOT NULL
)
"""
FLOOR_INSERT = (
    "INSERT INTO bench_jobs (id, tenant_id, model, training_file, status, method, metadata, "
    "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


# --- the floor server ---------------------------------------------------------------------


class _QueuePool:
    """The least a pool can be: N open autocommit connections handed out in turn."""

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn = dsn
        self.size = size
        self.idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await psycopg.AsyncConnection.connect(self.dsn, autocommit=True))

    async def close(self) -> None:
        while not self.idle.empty():
            await self.idle.get_nowait().close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await self.idle.get()
        try:
            yield conn
        finally:
            if conn.broken:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            self.idle.put_nowait(conn)


def _make_pool(dsn: str) -> Any:
    """psycopg_pool when it is installed, else the queue above (same behaviour for this load)."""
    try:
        from psycopg_pool import AsyncConnectionPool  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _QueuePool(dsn, POOL_SIZE)
    return AsyncConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=False
    )


def floor_app(dsn: str) -> Any:
    """The floor: parse, authorise against a constant, insert one row, answer with it."""
    from psycopg.types.json import Jsonb
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    pool = _make_pool(dsn)
    expected = f"Bearer {FLOOR_TOKEN}".encode()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message}}, status_code=status)

    async def create_job(request: Request) -> JSONResponse:
        presented = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            return error(401, "Incorrect API key provided.")
        try:
            body = await request.json()
        except ValueError:
            return error(400, "Request body is not valid JSON.")
        if not isinstance(body, dict):
            return error(400, "Request body must be a JSON object.")
        model, training_file = body.get("model"), body.get("training_file")
        if not isinstance(model, str) or not isinstance(training_file, str):
            return error(400, "'model' and 'training_file' must be strings.")
        row = {
            "id": "ftjob-" + secrets.token_hex(13),
            "tenant_id": FLOOR_TENANT,
            "model": model,
            "training_file": training_file,
            "status": "validating_files",
            "method": DEFAULT_METHOD,
            "metadata": body.get("metadata"),
            "created_at": int(time.time()),
        }
        params = [*row.values()]
        params[5], params[6] = Jsonb(row["method"]), Jsonb(row["metadata"])
        async with pool.connection() as conn:
            await conn.execute(FLOOR_INSERT, params)
        return JSONResponse({"object": "fine_tuning.job", **row})

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await pool.open()
        try:
            yield
        finally:
            await pool.close()

    routes = [
        Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve_floor(port: int, dsn: str) -> None:
    import uvicorn

    # The same uvicorn settings `loraplex api` uses: one worker, default loop and HTTP parser.
    uvicorn.run(floor_app(dsn), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- processes, database, cleanup -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loraplex_command() -> list[str]:
    script = Path(sys.executable).parent / "loraplex"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*_loraplex_command(), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"loraplex {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running(
    name: str, command: list[str], env: dict[str, str], port: int, logs: Path
) -> Iterator[Server]:
    """Start a server process, wait for /healthz, and always stop it afterwards."""
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        # A session of its own: Ctrl-C reaches only this script, which then stops it in order.
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, process, port, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer /healthz in 60 s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _with_db(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh database, dropped on the way out whatever happened."""
    name = f"loraplex_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clear_broker(redis_url: str) -> None:
    """Drop what the runs publish (every queue kombu declared in this Redis database, with its
    priority sub-queues, and the outbox dedup keys) so that each run starts from the same broker
    state: outbox row ids restart at 1 in every fresh database, and nothing consumes the
    messages. The default database (11) is the bench's own."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys: list[bytes] = []
        for binding in client.scan_iter(match="_kombu.binding*", count=1000):
            queue = binding.split(b".", 2)[-1]
            keys += [binding, queue]
            keys += [queue + KOMBU_PRIORITY_SEP + str(step).encode() for step in (3, 6, 9)]
        keys += client.scan_iter(match=DEDUP_KEY_PATTERN, count=1000)
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _training_file() -> bytes:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(12)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _query_ints(dsn: str, sql: LiteralString) -> list[int]:
    """The first row of a query whose columns are all integers (counts)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return [int(v) for v in row]


def _psycopg_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- load generation and statistics ---------------------------------------------------------


@dataclass
class Sample:
    scheduled: float
    sent: float
    finished: float
    outcome: str  # "200", "500", … or an exception's class name

    @property
    def ok(self) -> bool:
        return self.outcome.isdigit() and 200 <= int(self.outcome) < 300


class ProtocolError(Exception):
    pass


class Poster:
    """Sends one fixed HTTP/1.1 request over keep-alive connections, as cheaply as Python can.

    httpx costs about 2 ms of CPU per request here, more than the floor server itself; on a
    small machine that is CPU taken from the servers under test. The request bytes never
    change, so they are built once and only the status line and Content-Length are parsed.
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], body: bytes):
        self.host, self.port = host, port
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.gate = asyncio.Semaphore(MAX_CONNECTIONS)

    async def post(self) -> int:
        """The response's status code; raises on a broken, slow or malformed exchange."""
        async with self.gate, asyncio.timeout(REQUEST_TIMEOUT_S):
            while self.idle:
                reader, writer = self.idle.pop()
                if reader.at_eof() or writer.is_closing():
                    writer.close()
                    continue
                try:
                    return await self._exchange(reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    # The server closed an idle keep-alive connection (uvicorn does after 5 s)
                    # before our request reached it: retried on a fresh one, as any client does.
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise
            reader, writer = await asyncio.open_connection(self.host, self.port)
            return await self._exchange(reader, writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            writer.write(self.request)
            status, length, keep = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, body length, keep-alive) from a response head; the servers always send a
    Content-Length (no streamed bodies on this endpoint)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0]!r}")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if not fields.get("content-length", "").isdigit():
        raise ProtocolError("response without Content-Length")
    return int(parts[1]), int(fields["content-length"]), fields.get("connection") != "close"


async def _one(poster: Poster, scheduled: float) -> Sample:
    sent = time.perf_counter()
    try:
        outcome = str(await poster.post())
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
        outcome = type(exc).__name__
    return Sample(scheduled, sent, time.perf_counter(), outcome)


async def open_loop(poster: Poster, rate: float, duration: float) -> list[Sample]:
    """Send ``rate * duration`` requests, each at its scheduled instant; wait for them all.

    Times come from ``perf_counter``: uvloop's ``loop.time()`` has millisecond steps."""
    count = round(rate * duration)
    start = time.perf_counter() + 0.01
    tasks = []
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(poster, scheduled)))
    return list(await asyncio.gather(*tasks))


def _run(coro: Coroutine[Any, Any, Stats]) -> Stats:
    """Run the load generator on uvloop when it is installed: less client CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot (Linux; None elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Resources:
    """What the machine did during a measured window: a noise gauge and a cost per request."""

    server_cpu_ms_per_request: float | None
    client_cpu_ms_per_request: float
    machine_busy_pct: float | None
    load_1m_before: float


@dataclass
class _Mark:
    server_cpu: float | None
    client_cpu: float
    ticks: tuple[int, int] | None
    load: float

    @classmethod
    def now(cls, pid: int) -> _Mark:
        return cls(_process_cpu_s(pid), time.process_time(), _machine_ticks(), os.getloadavg()[0])

    def resources_since(self, pid: int, requests: int) -> Resources:
        end = _Mark.now(pid)
        server = None
        if self.server_cpu is not None and end.server_cpu is not None:
            server = (end.server_cpu - self.server_cpu) * 1000 / requests
        busy = None
        if self.ticks is not None and end.ticks is not None and end.ticks[1] > self.ticks[1]:
            busy = 100 * (end.ticks[0] - self.ticks[0]) / (end.ticks[1] - self.ticks[1])
        client = (end.client_cpu - self.client_cpu) * 1000 / requests
        return Resources(server, client, busy, self.load)


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Stats:
    target: str
    sent: int
    completed: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    achieved_rps: float
    send_lag_p99_ms: float
    resources: Resources | None = None
    rows_written: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def summarise(target: str, samples: list[Sample]) -> Stats:
    ok = [s for s in samples if s.ok]
    latencies = sorted((s.finished - s.scheduled) * 1000 for s in ok)
    lags = sorted((s.sent - s.scheduled) * 1000 for s in samples)
    errors = Counter(s.outcome for s in samples if not s.ok)
    window = max(s.finished for s in samples) - min(s.scheduled for s in samples)
    return Stats(
        target=target,
        sent=len(samples),
        completed=sum(1 for s in samples if s.outcome.isdigit()),
        errors=dict(sorted(errors.items())),
        p50_ms=_percentile(latencies, 0.50),
        p90_ms=_percentile(latencies, 0.90),
        p99_ms=_percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else math.nan,
        mean_ms=sum(latencies) / len(latencies) if latencies else math.nan,
        achieved_rps=len(ok) / window if window > 0 else 0.0,
        send_lag_p99_ms=_percentile(lags, 0.99),
    )


async def measure(
    target: str, server: Server, token: str, payload: dict[str, Any], args: argparse.Namespace
) -> Stats:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    poster = Poster(
        "127.0.0.1", server.port, "/v1/fine_tuning/jobs", headers, json.dumps(payload).encode()
    )
    try:
        if args.warmup > 0:
            await open_loop(poster, args.rate, args.warmup)
        mark = _Mark.now(server.process.pid)
        samples = await open_loop(poster, args.rate, args.duration)
        resources = mark.resources_since(server.process.pid, len(samples))
    finally:
        await poster.close()
    if server.process.poll() is not None:
        raise RuntimeError(f"{target} died during the run:\n{server.log_tail()}")
    stats = summarise(target, samples)
    stats.resources = resources
    return stats


# --- the two targets ------------------------------------------------------------------------


def bench_floor(db_url: str, args: argparse.Namespace) -> Stats:
    dsn = _psycopg_url(db_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FLOOR_TABLE)
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(port)]
    env = {**os.environ, "BENCH_FLOOR_DSN": dsn}
    payload = {"model": "tiny-llama", "training_file": "file-bench", "suffix": "bench"}
    with running("floor", command, env, port, args.logs) as server:
        stats = _run(measure("floor", server, FLOOR_TOKEN, payload, args))
    stats.rows_written = _query_ints(dsn, "SELECT count(*) FROM bench_jobs")[0]
    return stats


def _loraplex_env(db_url: str, redis_url: str, work: Path, overrides: list[str]) -> dict[str, str]:
    return {
        **os.environ,
        "LORAPLEX_DATABASE_URL": db_url,
        "LORAPLEX_BROKER_URL": redis_url,
        "LORAPLEX_STORAGE_URL": f"file://{work / 'objects'}",
        "LORAPLEX_DATA_DIR": str(work / "data"),
        "LORAPLEX_SECRET_KEY": secrets.token_urlsafe(30)[:40],
        "LORAPLEX_LOG_LEVEL": "WARNING",
        **dict(item.split("=", 1) for item in overrides),
    }


def _outbox_backlog(dsn: str, wait_s: float = 10.0) -> tuple[int, int]:
    """(rows, unpublished rows) of the outbox, after giving the dispatcher ``wait_s`` to drain."""
    deadline = time.monotonic() + wait_s
    while True:
        total, pending = _query_ints(
            dsn, "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM outbox"
        )
        if pending == 0 or time.monotonic() > deadline:
            return total, pending
        time.sleep(0.2)


def bench_loraplex(db_url: str, redis_url: str, work: Path, args: argparse.Namespace) -> Stats:
    env = _loraplex_env(db_url, redis_url, work, args.loraplex_env)
    _cli(env, "migrate")
    _cli(env, "models", "build-tiny", str(work / "tiny"))
    _cli(env, "models", "register", "tiny-llama", "--source", str(work / "tiny"))
    key = _cli(env, "admin", "create-tenant", "Bench", "--slug", "bench").strip().splitlines()[-1]
    port = _free_port()
    command = [*_loraplex_command(), "api", "--port", str(port)]
    with running("loraplex", command, env, port, args.logs) as server:
        upload = httpx.post(
            f"{server.base_url}/v1/files",
            headers={"authorization": f"Bearer {key}"},
            files={"file": ("train.jsonl", _training_file(), "application/jsonl")},
            data={"purpose": "fine-tune"},
            timeout=30,
        )
        if upload.status_code != 200:
            raise RuntimeError(f"upload failed: {upload.status_code} {upload.text}")
        payload = {"model": "tiny-llama", "training_file": upload.json()["id"], "suffix": "bench"}
        stats = _run(measure("loraplex", server, key, payload, args))
        dsn = _psycopg_url(db_url)
        total, pending = _outbox_backlog(dsn)
    stats.rows_written = _query_ints(dsn, "SELECT count(*) FROM fine_tuning_jobs")[0]
    stats.extra = {"outbox_rows": total, "outbox_unpublished_after_10s": pending}
    return stats


# --- report ---------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "n/a"


def _json_safe(value: Any) -> Any:
    """NaN (no successful request to measure) is not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def report(results: list[Stats], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    by = {r.target: r for r in results}
    lines = [
        f"Job creation, open loop: {args.rate:g} req/s for {args.duration:g} s "
        f"(+{args.warmup:g} s warm-up, not counted); latency from each request's scheduled "
        "send time, so it includes queueing, over the 2xx responses; no answer in "
        f"{REQUEST_TIMEOUT_S:g} s is an error. Servers: uvicorn, one worker.",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}.",
        "",
        "| target | sent | completed | errors | p50 ms | p90 ms | p99 ms | max ms | "
        "achieved req/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {r.target} | {r.sent} | {r.completed} | {errors} | {_ms(r.p50_ms)} | "
            f"{_ms(r.p90_ms)} | {_ms(r.p99_ms)} | {_ms(r.max_ms)} | {r.achieved_rps:.1f} |"
        )
    lines.append("")
    summary: dict[str, Any] = {}
    if "floor" in by and "loraplex" in by:
        floor, lpx = by["floor"], by["loraplex"]
        summary["ratio_p50"] = lpx.p50_ms / floor.p50_ms
        summary["ratio_p99"] = lpx.p99_ms / floor.p99_ms
        lines.append(
            f"loraplex / floor: p50 {summary['ratio_p50']:.2f}x, p99 {summary['ratio_p99']:.2f}x"
            if math.isfinite(summary["ratio_p50"]) and math.isfinite(summary["ratio_p99"])
            else "loraplex / floor: n/a (no successful loraplex request)"
        )
    for r in results:
        res = r.resources
        gauges = ""
        if res is not None:
            if res.server_cpu_ms_per_request is not None:
                gauges += f"server CPU {res.server_cpu_ms_per_request:.1f} ms/request, "
            gauges += f"client CPU {res.client_cpu_ms_per_request:.1f} ms/request, "
            if res.machine_busy_pct is not None:
                gauges += f"machine CPU busy {res.machine_busy_pct:.0f}%, "
            gauges += f"load average before {res.load_1m_before:.1f}, "
        lines.append(
            f"{r.target}: {gauges}client send lag p99 {_ms(r.send_lag_p99_ms)} ms, "
            f"rows in the database {r.rows_written}"
            + "".join(f", {k.replace('_', ' ')} {v}" for k, v in r.extra.items())
        )
    if "loraplex" in by:
        lpx = by["loraplex"]
        summary["target_p99"] = lpx.p99_ms <= TARGET_P99_MS
        summary["zero_errors"] = lpx.error_count == 0
        lines += [
            "",
            f"target p99 <= {TARGET_P99_MS:g} ms: {'PASS' if summary['target_p99'] else 'FAIL'}",
            f"zero errors: {'PASS' if summary['zero_errors'] else 'FAIL'}",
        ]
    data = {
        "benchmark": "control_plane.job_create",
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "target_p99_ms": TARGET_P99_MS,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "server": "uvicorn, 1 worker",
        "loraplex_env": args.loraplex_env,
        "results": [{**asdict(r), "error_count": r.error_count} for r in results],
        **summary,
    }
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="Requests scheduled per second.")
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Uncounted seconds first.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument(
        "--targets", default="floor,loraplex", help="Comma-separated, run in this order."
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="A database on the server to bench, used to create and drop the scratch database.",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
        help="Broker for loraplex (a database of its own): the queues and outbox dedup keys "
        "that the run creates there are deleted.",
    )
    parser.add_argument(
        "--loraplex-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra environment for the loraplex processes, e.g. "
        "LORAPLEX_DISPATCHER_ENABLED=false (repeatable; for experiments).",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="Keep the servers' output in this folder (default: a temporary one, removed).",
    )
    parser.add_argument("--strict", action="store_true", help="Exit 1 when a verdict fails.")
    parser.add_argument("--serve-floor", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_floor is not None:
        serve_floor(args.serve_floor, os.environ["BENCH_FLOOR_DSN"])
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or set(targets) - {"floor", "loraplex"}:
        parser.error("--targets takes floor and/or loraplex")
    if any("=" not in item for item in args.loraplex_env):
        parser.error("--loraplex-env takes NAME=VALUE")

    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the database dropped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    if args.logs is None:
        args.logs = work
    args.logs.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        with scratch_database(args.postgres_url) as database:
            db_url = _with_db(args.postgres_url, database).replace(
                "postgresql://", "postgresql+psycopg://", 1
            )
            _clear_broker(args.redis_url)
            try:
                for target in targets:
                    print(f"running {target}…", file=sys.stderr, flush=True)
                    if target == "floor":
                        results.append(bench_floor(db_url, args))
                    else:
                        results.append(bench_loraplex(db_url, args.redis_url, work, args))
            finally:
                _clear_broker(args.redis_url)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text, data = report(results, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    failed = data.get("target_p99") is False or data.get("zero_errors") is False
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped, scratch database dropped", file=sys.stderr)
        sys.exit(130)
