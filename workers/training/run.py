"""Entry point of the training subprocess: ``python -m workers.training.run SPEC.json``.

Events go to stdout as JSON lines (events.py), human-readable logs to stderr. Exit 0 after
``done`` or ``paused``, 1 after ``error``. SIGUSR1 pauses at the next step boundary (checkpoint,
then ``paused``), however early it arrives: its handler is the first thing this module installs
(pause_signal.py). SIGTERM ends the process at once (the default action: cancel needs no
cleanup).

With ``nproc > 1`` (from the spec, or ``--nproc``), this process becomes the launcher of a
torchrun group (launcher.py) and relays its events; under torchrun (``LOCAL_RANK`` set) it is
one rank of that group.
"""

from __future__ import annotations

# First of all: from here on a pause request (SIGUSR1) only sets a flag. Its default action would
# end the process, and the worker may send it while torch and the model are still loading.
from workers.training import pause_signal

pause_signal.install()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

_STARTED = time.monotonic()

# Before torch and Hugging Face are imported (they read these once): no model hub is consulted,
# no tokenizer thread pools are started in a process that may be forked, and OpenMP threads sleep
# instead of spinning when they wait. Spinning is what OpenMP does by default and it is a disaster
# on a CPU that other processes share: a thread that finished its half of an op spins while the
# other half waits to be scheduled. Measured on the 2-core development machine with another
# training running: one tiny-model forward took 1.3 s with 2 spinning threads, 0.03 s with
# OMP_WAIT_POLICY=PASSIVE (0.02 s with 1 thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from workers.training.events import EventStream, error_message  # noqa: E402
from workers.training.spec import TrainingSpec, check_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.training.run")
    parser.add_argument("spec", help="path of the TrainingSpec JSON file")
    parser.add_argument("--nproc", type=int, default=None, help="processes (overrides the spec)")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    under_torchrun = "LOCAL_RANK" in os.environ
    events = EventStream.take_stdout(enabled=rank == 0)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s",
    )
    try:
        spec = TrainingSpec.load(args.spec)
        check_inputs(spec)
        nproc = args.nproc or spec.nproc
        if nproc > 1 and not under_torchrun:
            from workers.training.launcher import run_distributed

            return run_distributed(args.spec, nproc, events)
        if under_torchrun:
            from workers.training.launcher import die_with_parent

            die_with_parent()
        from workers.training.recipe import run_training

        return run_training(spec, events, started=_STARTED)
    except Exception as exc:  # noqa: BLE001 - every failure must end as an error event
        traceback.print_exc(file=sys.stderr)
        events.emit("error", message=error_message(exc))
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
