"""Transfer progress on stderr: tqdm bars on a terminal, short lines elsewhere."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from objdl.cli._common import human_size

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """Progress of several transfers on stderr.

    On a terminal, one tqdm bar per transfer (bytes, rate, ETA); otherwise (a log, a
    pipe) a short line per transfer at most every `line_interval` seconds, and one at
    its end. Safe to update from several threads.
    """

    def __init__(
        self, enabled: bool = True, stream: IO[str] | None = None, line_interval: float = 1.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bars_on = enabled and self.stream.isatty()
        self.line_interval = line_interval
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._lines: dict[str, tuple[float, int]] = {}  # key -> (next line due, bytes shown)
        self._ended: dict[str, float] = {}  # key -> its bar's elapsed seconds when it ended
        self._closed = False

    def update(self, key: str, label: str, done: int, total: int | None, rate: float) -> None:
        """Transfer `key` (shown as `label`) has `done` of `total` bytes, at `rate` B/s."""
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                return
            if self.bars_on:
                self._update_bar(key, label, done, total)
            else:
                self._update_line(key, label, done, total, rate)

    def _update_bar(self, key: str, label: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                position=len(self._bars),
                leave=True,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.1,
            )
        if total is not None and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)
        else:
            bar.refresh()
        if total is not None and done >= total:
            self._ended.setdefault(key, bar.format_dict["elapsed"])

    def _update_line(self, key: str, label: str, done: int, total: int | None, rate: float) -> None:
        now = time.monotonic()
        due, shown = self._lines.get(key, (0.0, -1))
        end = total is not None and done >= total
        if done == shown or (now < due and not end):
            return
        self._lines[key] = (now + self.line_interval, done)
        pct = f"{100 * done / total:3.0f}% " if total else ""
        of = f" of {human_size(total)}" if total is not None else ""
        speed = f", {human_size(rate)}/s" if rate > 0 else ""
        print(
            f"objdl: {label}: {pct}{human_size(done)}{of}{speed}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """End the display; bars stay on screen, each with its own final rate."""
        with self._lock:
            self._closed = True
            bars, self._bars = dict(self._bars), {}
        for key, bar in bars.items():
            if key in self._ended:  # tqdm's final rate counts up to close(): stop its clock
                bar.start_t += bar.format_dict["elapsed"] - self._ended[key]
            bar.close()
