"""The training process's event stream: a heartbeat only when nothing else went out lately."""

from __future__ import annotations

import io
import json
import time

from workers.training.events import EventStream


def _kinds(out: io.StringIO) -> list[str]:
    return [json.loads(line)["type"] for line in out.getvalue().splitlines()]


def test_a_heartbeat_goes_out_only_after_a_quiet_spell() -> None:
    out = io.StringIO()
    events = EventStream(out)
    events.emit("metrics", step=1)
    events.heartbeat(every=0.3, step=1)  # the metrics just went out
    assert _kinds(out) == ["metrics"]
    time.sleep(0.35)
    events.heartbeat(every=0.3, step=2)
    events.heartbeat(every=0.3, step=2)  # the heartbeat itself counts
    assert _kinds(out) == ["metrics", "heartbeat"]
    assert json.loads(out.getvalue().splitlines()[-1]) == {"type": "heartbeat", "step": 2}


def test_only_the_reporting_process_sends_heartbeats() -> None:
    out = io.StringIO()
    EventStream(out, enabled=False).heartbeat(every=0, step=1)
    assert out.getvalue() == ""
