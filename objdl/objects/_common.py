"""What the ready consumers share: failure as an exception, and running a download."""

from __future__ import annotations

from typing import Any

from objdl.cell import CellLike
from objdl.downloader import SizedConsumer, download_object
from objdl.errors import ObjdlError

__all__ = ["DEFAULT_MAX_MEMORY_SIZE", "DownloadError", "run_download"]

DEFAULT_REQUEST_TIMEOUT = 30.0
# The largest object download_bytes/download_dict accept unless told otherwise.
# Models of a few GB fit with room (a 3B-parameter model in fp16 is 6 GB); a claim
# beyond it, on the 16-64 GB hosts such jobs run on, is a mistake or an attack,
# and holding it in memory beside the process's own copy would crowd the host.
# Bigger objects go to download_file (streamed to disk, no default limit), or pass
# a larger max_size (None: no limit). The buffer grows only as verified data
# arrives, so this bounds what an owner can make a site hold, not what it allocates.
DEFAULT_MAX_MEMORY_SIZE = 8 * 1024**3


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
    cell: CellLike,
    from_fqcn: str,
    ref_id: str,
    consumer: SizedConsumer,
    outcome: Outcome,
    per_request_timeout: float,
    kwargs: dict[str, Any],
) -> None:
    """Run :func:`download_object`; raise :class:`DownloadError` unless it completed.

    Whatever the owner sends, the consumer ends in ``download_completed`` or
    ``download_failed`` (download_object checks every reply), so a hostile owner
    can make this raise DownloadError and nothing else.
    """
    download_object(from_fqcn, ref_id, per_request_timeout, cell, consumer, **kwargs)
    if outcome.ok is not True:
        raise DownloadError(ref_id, from_fqcn, outcome.reason or "the download did not complete")
