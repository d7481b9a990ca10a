"""``--json``: one JSON object per line on stdout for every event, for scripts.

Each line is an object with ``"event"`` (its kind) and ``"time"`` (seconds since the
epoch, a float); the other fields depend on the kind and are listed in the README
("Machine-readable output"). Progress is sent at most once a second per transfer,
plus once when a transfer reaches its total. Lines are written whole and flushed,
from any thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

__all__ = ["Events"]


class Events:
    """Writes events as JSON lines when `enabled`; does nothing otherwise."""

    def __init__(
        self, enabled: bool, stream: IO[str] | None = None, progress_interval: float = 1.0
    ) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.progress_interval = progress_interval
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def progress(self, key: str, done: int, total: int | None, **fields: Any) -> None:
        """A ``progress`` event for transfer `key`, unless one went out less than a second ago."""
        if not self.enabled:
            return
        now = time.monotonic()
        end = total is not None and done >= total
        with self._lock:
            due = self._due.get(key, 0.0)
            if due == float("inf") or (now < due and not end):
                return
            self._due[key] = float("inf") if end else now + self.progress_interval
        self.emit("progress", bytes=done, total=total, **fields)
