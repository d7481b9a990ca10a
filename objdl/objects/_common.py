"""What the ready consumers share: failure as an exception, and running a download."""

from __future__ import annotations

from typing import Any

from objdl.cell import Cell
from objdl.downloader import SizedConsumer, download_object
from objdl.errors import ObjdlError

__all__ = ["DownloadError", "run_download"]

DEFAULT_REQUEST_TIMEOUT = 30.0


class DownloadError(ObjdlError):
    """A one-call download did not complete; `reason` says why (as download_failed got it)."""

    def __init__(self, ref_id: str, owner: str, reason: str) -> None:
        super().__init__(f"download of {ref_id} from {owner} failed: {reason}")
        self.ref_id = ref_id
        self.owner = owner
        self.reason = reason


class Outcome:
    """Set by a consumer's end callbacks: None while running, then ok or a reason."""

    def __init__(self) -> None:
        self.ok: bool | None = None
        self.reason = ""


def run_download(
    cell: Cell,
    from_fqcn: str,
    ref_id: str,
    consumer: SizedConsumer,
    outcome: Outcome,
    per_request_timeout: float,
    kwargs: dict[str, Any],
) -> None:
    """Run :func:`download_object`; raise :class:`DownloadError` unless it completed."""
    download_object(from_fqcn, ref_id, per_request_timeout, cell, consumer, **kwargs)
    if outcome.ok is not True:
        raise DownloadError(ref_id, from_fqcn, outcome.reason or "the download did not complete")
