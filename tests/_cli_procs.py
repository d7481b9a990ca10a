"""Running the objdl command and the examples as child processes, for the CLI tests.

Every child runs with this checkout first on PYTHONPATH, so the tests exercise these
files whatever copy of objdl happens to be installed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "objdl.cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBJDL_")}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(
    args: list[str],
    timeout: float = 30.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (killed, by pid, if it outlives `timeout`); `env` adds
    variables (the caller's OBJDL_* settings are never inherited)."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=child_env(env), cwd=cwd or ROOT
    )


def run_cli(
    args: list[str],
    timeout: float = 30.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return run([*CLI, *args], timeout, cwd, env)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """A non-zero exit with exactly one stderr line, ``objdl: error: ...``, holding `expected`."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("objdl: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


class Child:
    """A child process whose stdout and stderr lines are collected as they come."""

    def __init__(
        self, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(env),
            cwd=cwd or ROOT,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._new: queue.SimpleQueue[str] = queue.SimpleQueue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out, True)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err, False)),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: IO[str], into: list[str], notify: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if notify:
                self._new.put(line)

    def wait_for_line(self, pred: Callable[[str], bool], timeout: float = 20.0) -> str:
        """The first stdout line (seen so far or to come) for which `pred` is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.out[seen:]:
                if pred(line):
                    return line
            seen = len(self.out)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no such line within {timeout}s; out={self.out} err={self.err}"
                )
            if self.proc.poll() is not None and seen == len(self.out):
                for t in self._readers:
                    t.join(1.0)
                if len(self.out) == seen:
                    raise AssertionError(
                        f"exited {self.proc.returncode} first; out={self.out} err={self.err}"
                    )
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.1))

    def wait(self, timeout: float = 20.0) -> int:
        """Its exit status, once it has ended and its output is read."""
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(timeout)
        return rc

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """End it by its pid if it still runs; reap it; close its pipes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        for t in self._readers:
            t.join(10.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
