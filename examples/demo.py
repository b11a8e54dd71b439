"""The main job end to end on embedded defaults (``make demo``).

Starts ``loraplex up`` (API + gateway on one port, a worker, vLLM for the tiny model, SQLite,
a local object folder), makes an API key, registers a webhook to a small receiver in this
process, uploads ``examples/facts.jsonl`` (invented facts no base model can know) and fine-tunes
on it with the official ``openai`` SDK, showing progress; then asks the base model and the
fine-tuned model the same questions through ``client.chat.completions.create``, prints the
answers side by side, and shows the webhook it received, verified with ``standardwebhooks``.

Re-running it is fine (the state folder is reused; each run trains a new model). Ctrl-C stops
everything it started. ``--summary FILE`` writes the outcome as JSON (CI asserts on it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import standardwebhooks
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "examples" / "facts.jsonl"
BASE_MODEL = "tiny-llama"
# 64 examples (the 16 facts four times), 8 a step, 50 epochs: 400 steps, about a minute here.
HYPERPARAMETERS = {
    "n_epochs": 50,
    "batch_size": 8,
    "learning_rate_multiplier": 10,
    "lora_rank": 16,
    "max_seq_len": 256,
}
ANSWER_TOKENS = 48

sys.path.insert(0, str(ROOT))
from cli.watch import watch_job  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class WebhookReceiver:
    """A local HTTP server that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                receiver.arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stack:
    """``loraplex up`` in its own process group, stopped (with everything it started) on exit."""

    def __init__(self, port: int, data_dir: Path, allow_host: str) -> None:
        self.port = port
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "LORAPLEX_DATA_DIR": str(data_dir),
            "LORAPLEX_LOG_LEVEL": "WARNING",
            # The demo's own receiver, on loopback, and nothing else.
            "LORAPLEX_WEBHOOK_ALLOW_HOSTS": allow_host,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for name in ("LORAPLEX_DATABASE_URL", "LORAPLEX_BROKER_URL", "LORAPLEX_STORAGE_URL"):
            self.env.pop(name, None)  # embedded defaults
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "up.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def group_pids(self) -> list[int]:
        if self.process is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        pids.append(int(entry.name))
                except ProcessLookupError:
                    continue
        return pids

    def stop(self) -> list[int]:
        """Stop like Ctrl-C would, then make sure nothing of the group is left; returns pids."""
        if self.process is None:
            return []
        pids = self.group_pids()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 20
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_pids():
            os.killpg(self.process.pid, signal.SIGKILL)
        return pids

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"`loraplex up` exited; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the stack did not become ready in {timeout:.0f} s; see {self.log_path}"
        )


def wait_for_serving(client: OpenAI, timeout: float) -> None:
    """vLLM loads in 30-60 s on a CPU; the gateway answers 503 until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.chat.completions.create(
                model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def ask(client: OpenAI, model: str, messages: list[dict[str, str]]) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=ANSWER_TOKENS,
        temperature=0,
    )
    return (response.choices[0].message.content or "").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".loraplex-demo")
    parser.add_argument("--summary", type=Path, help="write the outcome as JSON here")
    parser.add_argument("--questions", type=int, default=6, help="facts to ask about")
    args = parser.parse_args(argv)
    # A plain `kill` must clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    receiver = WebhookReceiver()
    stack = Stack(args.port or free_port(), args.data_dir.resolve(), "127.0.0.1")
    summary: dict[str, Any] = {"ok": False}
    try:
        print(f"starting loraplex (API + gateway + worker + vLLM) at {stack.base_url} ...")
        stack.start()
        stack.wait_ready(300)
        key = stack.cli("admin", "create-key", "demo", "--scopes", "finetune,inference")
        key = key.strip().splitlines()[-1]
        client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=2, timeout=120)
        http = httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

        endpoint = http.post(
            "/webhook_endpoints",
            json={"url": receiver.url, "events": ["fine_tuning.job.succeeded"]},
        )
        endpoint.raise_for_status()
        secret = endpoint.json()["secret"]
        print(f"webhook endpoint registered: {receiver.url}")

        upload = client.files.create(
            file=("facts.jsonl", io.BytesIO(FACTS.read_bytes() * 4)), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(
            model=BASE_MODEL,
            training_file=upload.id,
            suffix="facts",
            seed=0,
            method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},  # type: ignore[typeddict-item]
        )
        print(f"fine-tuning job {job.id} (file {upload.id}):")
        final = watch_job(http, job.id, timeout=900)
        summary["job_status"] = final["status"]
        if final["status"] != "succeeded":
            print(f"the job ended {final['status']}: {final.get('error')}")
            return 1
        model = final["fine_tuned_model"]
        print(f"fine-tuned model: {model}")

        wait_for_serving(client, 300)
        facts = [json.loads(line)["messages"] for line in FACTS.read_text().splitlines()]
        rows = []
        for messages in facts[: args.questions]:
            prompt, expected = messages[:-1], messages[-1]["content"]
            rows.append(
                (
                    prompt[-1]["content"],
                    ask(client, BASE_MODEL, prompt),
                    ask(client, model, prompt),
                    expected,
                )
            )
        print()
        for question, base, tuned, expected in rows:
            print(f"Q: {question}")
            print(f"   base model : {base[:100]!r}")
            print(f"   fine-tuned : {tuned[:100]!r}  {'(exact)' if tuned == expected else ''}")
        summary["questions"] = len(rows)
        summary["base_exact"] = sum(base == expected for _, base, _, expected in rows)
        summary["tuned_exact"] = sum(tuned == expected for _, _, tuned, expected in rows)

        receiver.arrived.wait(60)
        verified = False
        for headers, body in receiver.received:
            payload = standardwebhooks.Webhook(secret).verify(body.decode(), headers)
            if payload["data"]["id"] == job.id:
                verified = True
                print(
                    f"\nwebhook received and verified: {payload['type']} "
                    f"(webhook-id {headers['webhook-id']})"
                )
        summary["webhook_verified"] = verified
        print(f"admin dashboard: http://127.0.0.1:{stack.port}/admin")
        summary["ok"] = verified and summary["tuned_exact"] > summary["base_exact"]
        return 0 if summary["ok"] else 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        summary["stopped_pids"] = stack.stop()
        summary["left_running"] = [p for p in summary["stopped_pids"] if _alive(p)]
        summary["seconds"] = round(time.monotonic() - started, 1)
        receiver.close()
        print(f"stopped everything ({summary['seconds']} s in all)")
        if args.summary:
            args.summary.write_text(json.dumps(summary, indent=2))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours that was never waited for is not running.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


if __name__ == "__main__":
    sys.exit(main())
