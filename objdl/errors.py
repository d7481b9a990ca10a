"""Exception types raised by objdl; all share the root :class:`ObjdlError`.

Remote trouble (timeouts, unreachable cells, a crashed handler) is reported as a
return code in a reply, never raised; these exceptions are for misuse and for local
conditions a caller has to act on.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "CellError",
    "NameTakenError",
    "ObjdlError",
    "WireError",
]


class ObjdlError(Exception):
    """Root of every exception objdl raises on purpose."""


class WireError(ObjdlError):
    """Frames that do not decode to a valid message (junk, truncation, wrong types)."""


class CellError(ObjdlError):
    """A cell could not do what was asked (not started, already stopped, bad state)."""


class BrokerUnavailableError(CellError):
    """No broker answered the cell's registration within the start timeout."""

    def __init__(self, broker_url: str, timeout: float) -> None:
        super().__init__(
            f"no broker answered at {broker_url} within {timeout:g}s: "
            "start one (objdl-broker --bind URL) or check the URL"
        )
        self.broker_url = broker_url
        self.timeout = timeout


class NameTakenError(CellError):
    """The broker refused the cell's name because a live cell already holds it."""

    def __init__(self, fqcn: str, reason: str = "") -> None:
        text = f"the broker refused the name {fqcn!r}: a live cell already uses it"
        if reason:
            text += f" ({reason})"
        super().__init__(text + "; stop that cell or choose another name")
        self.fqcn = fqcn
