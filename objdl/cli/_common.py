"""What the objdl subcommands share: exit codes, input checks, cells, signals, sizes."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from objdl import fqcn as _fqcn
from objdl.errors import ObjdlError

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_CONNECT_TIMEOUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "StopFlag",
    "check_broker_url",
    "check_destination",
    "check_name",
    "check_positive",
    "check_source",
    "human_size",
    "parse_size",
    "stop_on_signals",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_BROKER = "tcp://127.0.0.1:8002"
DEFAULT_CONNECT_TIMEOUT = 5.0
# After the last site finished, the owner's final replies are still on their way out;
# Cell.stop() closes the socket at once (linger 0), so give them this long to leave.
_MIB = 1024 * 1024
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_TCP_URL = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


_KINDS = {EXIT_USAGE: "usage", EXIT_INTERRUPTED: "interrupted"}


class CliError(ObjdlError):
    """A user-facing failure: printed as one ``objdl: error: ...`` line, never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED, kind: str | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the cause said
        self.code = code
        self.kind = kind or _KINDS.get(code, "failed")


# ---------------------------------------------------------------- input checks


def parse_size(text: str) -> int:
    """Parse ``256MiB``, ``1.5GiB``, ``100MB``, ``4096`` into bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: use a number with B, KiB, MiB, GiB, KB, MB, GB")
    n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return n


def check_name(option: str, name: str) -> str:
    try:
        return _fqcn.validate(name)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", EXIT_USAGE) from None


def check_broker_url(url: str) -> str:
    """Refuse what ZeroMQ would choke on later, in a thread, with a traceback.

    A comma-separated list names the broker and its standbys, tried in that order.
    """
    urls = [u.strip() for u in url.split(",")]
    for one in urls:
        m = _TCP_URL.fullmatch(one)
        if m is not None and 1 <= int(m.group("port")) <= 65535:
            continue
        if one.startswith("ipc://") and len(one) > len("ipc://"):
            continue
        raise CliError(
            f"--broker: invalid broker URL {one!r}: use tcp://HOST:PORT (e.g. {DEFAULT_BROKER}) "
            "or ipc://PATH, or several separated by commas (a broker and its standbys)",
            EXIT_USAGE,
        )
    if len(set(urls)) != len(urls):
        raise CliError(f"--broker: {url!r} names a broker twice", EXIT_USAGE)
    return ",".join(urls)


def check_positive(option: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise CliError(f"{option}: must be more than 0, got {value:g}", EXIT_USAGE)


def check_source(path: Path) -> None:
    if not path.exists():
        raise CliError(f"cannot serve {path}: no such file", EXIT_USAGE)
    if not path.is_file():
        raise CliError(f"cannot serve {path}: not a regular file", EXIT_USAGE)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"cannot serve {path}: {exc.strerror or exc}", EXIT_USAGE) from None


def check_destination(dest: Path) -> None:
    """Refuse, before connecting, a ``-o`` that ``download_file`` would refuse later.

    The check is the library's (:func:`objdl.objects.check_destination`): a missing or
    unwritable folder, a folder, a symlink, a FIFO, a device or a socket at `dest`.
    """
    from objdl.objects import check_destination as library_check

    try:
        library_check(dest)
    except OSError as exc:
        raise CliError(f"-o {dest}: {exc}", EXIT_USAGE) from None


# ---------------------------------------------------------------- signals


class StopFlag:
    """Set by SIGINT/SIGTERM. A handler only stores the signal: taking a lock there (as
    ``Event.set`` does) can deadlock against the main thread it interrupted."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A flag that SIGINT and SIGTERM set (instead of killing us) while in the block.

    A second signal raises KeyboardInterrupt, so a stuck clean-up can still be cut short.
    """
    flag = StopFlag()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    previous: list[tuple[signal.Signals, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous.append((sig, signal.signal(sig, on_signal)))
    try:
        yield flag
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)


def human_size(n: float) -> str:
    """``512 B``, ``3.0 KiB``, ``28.6 MiB``, ``1.50 GiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    if n < _MIB:
        return f"{n / 1024:.1f} KiB"
    if n < 1024 * _MIB:
        return f"{n / _MIB:.1f} MiB"
    return f"{n / (1024 * _MIB):.2f} GiB"
