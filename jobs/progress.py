"""The worker's link between a running engine and its Job row: progress, log, heartbeat and cancel.

The engine calls the recorder for every event (many log lines a second); a background thread writes what
accumulated once per COMPRESSOR_HEARTBEAT_INTERVAL_S through jobs.services.lifecycle.job_record_progress. That
one write is also the heartbeat the reaper watches, and its answer is the cancel signal: when the row is no
longer RUNNING for this run (cancelled, or handed to a newer run), should_cancel() turns True and the engine
stops at its next step. The same happens once the job's soft time limit has passed (time_is_up), even if
some broad `except Exception` in a library swallowed Celery's SoftTimeLimitExceeded.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.db import connection

from engine.errors import CancelledError
from engine.spec import ProgressEvent, Stage
from jobs.services import lifecycle

logger = logging.getLogger(__name__)


class JobProgress:
    def __init__(self, *, job_id: int, task_id: str, interval_s: float) -> None:
        self.job_id = job_id
        self.task_id = task_id
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {}
        self._lines: list[tuple[str, str]] = []
        self._stage = Stage.PREPARING
        self._message = ""
        self._percent = 0.0
        self._cancelled = threading.Event()
        self._time_is_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}-progress", daemon=True)

    # The engine's callbacks (called on the task's thread; they never touch the database).

    def __call__(self, event: ProgressEvent) -> None:
        # Evaluation reports through this callback only: it must stop there too when asked to.
        if event.log_line is None and self.should_cancel():
            raise CancelledError("The job was cancelled.")
        with self._lock:
            if event.log_line is not None:
                self._lines.append((event.stage, event.log_line))
                return
            self._stage = event.stage
            if event.fraction is not None:  # the engine weighs its stages by their cost; never go back
                self._percent = max(self._percent, round(100.0 * event.fraction, 1))
            self._fields = {
                "stage": event.stage,
                "step": event.step,
                "total": event.total,
                "percent": self._percent,
                "message": event.message,
            }
            if event.message and event.message != self._message:  # steps within one part repeat its message
                self._lines.append((event.stage, event.message))
            self._message = event.message

    def should_cancel(self) -> bool:
        return self._cancelled.is_set() or self._time_is_up.is_set()

    def time_is_up(self) -> None:
        """The soft time limit passed: stop at the next step like a cancel (the task reports the limit)."""
        self._time_is_up.set()

    @property
    def out_of_time(self) -> bool:
        return self._time_is_up.is_set()

    def log(self, text: str) -> None:
        with self._lock:
            self._lines.append((self._stage, text))

    # The background writer.

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the writer and store what is left (on the caller's thread)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self.flush()

    def flush(self) -> None:
        with self._lock:
            fields, lines = self._fields, self._lines
            self._fields, self._lines = {}, []
        try:
            running = lifecycle.job_record_progress(job_id=self.job_id, task_id=self.task_id, log_lines=lines, **fields)
        except Exception:  # a database hiccup must not kill the job; the next beat tries again
            logger.exception("Could not record progress of job %s", self.job_id)
            with self._lock:
                self._lines = lines + self._lines
            return
        if not running:
            self._cancelled.set()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.flush()
        finally:
            connection.close()  # this thread's own database connection
