"""Keeping a claimed job's lease alive for the whole attempt.

The worker's own thread blocks for long stretches that are not training: downloading the base
model, a checkpoint or the tokenized data, uploading checkpoints and the adapter, waiting for
the gateway's parity answer. A lease extended only between those steps would run out during
them, and the reaper would hand a healthy job to another worker. So a thread of its own does
the fenced ``touch`` every heartbeat from the claim to the end of the attempt, and says when the
attempt lost the job: fenced out (taken over, finished or cancelled), or unable to reach the
database for about as long as the lease lasts. Shorter outages (a failover, a pool timeout) only
cost a few missed beats.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from models_db.session import transaction
from workers.jobs import repository as repo

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Extends ``claim``'s lease every ``interval`` seconds until stopped or fenced out."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        claim: repo.Claim,
        *,
        lease_seconds: int,
        interval: float,
    ) -> None:
        self._factory = session_factory
        self._claim = claim
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._stop = threading.Event()
        # Set once the attempt no longer owns the job, or can no longer tell that it does.
        self.lost = threading.Event()
        self.flags = repo.Flags(cancel_requested=False, pause_requested=False)
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        extended = time.monotonic()
        # Past this, the lease may have run out and another worker may hold the job.
        give_up_after = self._lease_seconds - 2 * self._interval
        while not self._stop.wait(self._interval):
            try:
                with transaction(self._factory) as session:
                    self.flags = repo.touch(session, self._claim, self._lease_seconds)
                extended = time.monotonic()
            except repo.LostJob:
                self.lost.set()
                return
            except Exception:
                if time.monotonic() - extended >= give_up_after:
                    log.error(
                        "job %s: lease not extended for %.0f s; giving the attempt up",
                        self._claim.job_id,
                        time.monotonic() - extended,
                        exc_info=True,
                    )
                    self.lost.set()
                    return
                log.warning("job %s: lease not extended", self._claim.job_id, exc_info=True)
