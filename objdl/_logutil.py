"""Logging helpers shared by the I/O shells."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog", "peer_text"]


def peer_text(text: str, limit: int) -> str:
    """`text` that a peer chose, cut to `limit` characters and safe to print or log.

    Every character that does not print (control characters such as ESC and BEL,
    bidi overrides, line and paragraph separators) is written as its escape
    (``\\x1b``, ``\\u202e``), so a peer's error text or ref id cannot move the cursor,
    retitle or clear the terminal that shows our log or error line, nor forge log lines.
    """
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RateLimitedLog:
    """Log at most one line per key every `interval` seconds, counting the rest.

    Untrusted peers can make us log (bad frames, unknown refs); this keeps a flood
    from filling a disk or stalling the thread that logs. The suppressed count is
    reported with the next line that does get through.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` under `key` unless that key logged recently; True if logged."""
        now = self._clock()
        with self._lock:
            if now < self._next.get(key, float("-inf")):
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if len(self._next) > 10_000:  # keys come from peers: keep the table bounded
                self._next.clear()
            self._next[key] = now + self._interval
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args)
        return True
