"""How the worker starts the recipe, and the multi-process (DDP) launcher behind it.

``launch_command(spec_path, nproc)`` is the argv the worker runs. It is always
``python -m workers.training.run SPEC [--nproc N]``, also for N > 1, rather than torchrun itself:
the worker pauses a run with SIGUSR1 and cancels it with SIGTERM/SIGKILL sent to the process it
started, and torchrun's agent neither forwards SIGUSR1 (its default action would kill the agent
and orphan the ranks) nor takes its ranks down when it is killed. So for N > 1 that process runs
``torchrun --standalone --nproc-per-node N -m workers.training.run SPEC`` as its child and:

* relays the ranks' event lines to its own stdout, keeping the first terminal event
  (done/paused/error) and reporting an error if the group dies without one;
* on SIGUSR1 (also one that arrived before torchrun was started: pause_signal.py) creates a
  sentinel file the ranks poll after every step (progress.py), so the whole group pauses after
  the same step;
* on SIGTERM terminates the group; if it is killed outright, the group follows, because torchrun
  and every rank ask the kernel to SIGKILL them when their parent dies (``die_with_parent``).

``torchrun --nproc-per-node 2 -m workers.training.run SPEC`` run by hand works as well; only
pause is then unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from workers.training import pause_signal
from workers.training.events import EventStream

PAUSE_FILE_ENV = "LORAPLEX_PAUSE_FILE"  # read by progress.PauseRequest
TERMINAL_EVENTS = ("done", "paused", "error")
_PR_SET_PDEATHSIG = 1


def launch_command(spec_path: str | Path, nproc: int = 1) -> list[str]:
    """The argv that runs the recipe for ``spec_path`` with ``nproc`` processes."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    argv = [sys.executable, "-m", "workers.training.run", str(spec_path)]
    return argv if nproc == 1 else [*argv, "--nproc", str(nproc)]


def torchrun_command(spec_path: str | Path, nproc: int) -> list[str]:
    """torchrun on this host (``--standalone`` picks a free rendezvous port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "workers.training.run",
        str(spec_path),
    ]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_distributed(spec_path: str, nproc: int, events: EventStream) -> int:
    """Run the recipe under torchrun as a child group; relay its events; return the exit code."""
    pause_signal.install()  # run.py did already; a caller that is not run.py gets it here
    sentinel_dir = Path(tempfile.mkdtemp(prefix="loraplex-pause-"))
    sentinel = sentinel_dir / "pause"
    # A pause asked for at any time, before the group is started included, reaches every rank.
    forget_pause = pause_signal.when_requested(sentinel.touch)
    env = {**os.environ, PAUSE_FILE_ENV: str(sentinel)}
    child = subprocess.Popen(
        torchrun_command(spec_path, nproc),
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        # Its own process group, so that a signal the worker sends to ours does not reach the
        # torchrun agent, whose default action for SIGUSR1 is to die.
        start_new_session=True,
        preexec_fn=die_with_parent,  # only sets the death signal: safe before exec
    )
    terminated = False

    def on_terminate(signum: int, frame: FrameType | None) -> None:
        nonlocal terminated
        terminated = True
        _signal_group(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_terminate)
    terminal: str | None = None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            kind = _event_type(line)
            if kind is None:
                sys.stderr.write(line)
                continue
            if terminal is not None:
                continue  # one terminal event per run; later ones (other ranks) only repeat it
            if kind in TERMINAL_EVENTS:
                terminal = kind
            events.write(json.loads(line))
        try:
            code = child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            code = child.wait()
    finally:
        if child.poll() is None:
            _signal_group(child, signal.SIGKILL)
            child.wait()
        forget_pause()
        sentinel.unlink(missing_ok=True)
        sentinel_dir.rmdir()
    if terminated:
        return 128 + signal.SIGTERM
    if terminal is None:
        events.emit(
            "error", message=f"the training processes exited with code {code} and no result"
        )
        return 1
    return 0 if terminal in ("done", "paused") and code == 0 else 1


def _signal_group(child: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)


def _event_type(line: str) -> str | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else None
