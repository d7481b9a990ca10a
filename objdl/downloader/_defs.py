"""Names, return codes and the two extension points of the object downloader.

These keep the seed's names, signatures and meaning, so code written for the seed
ports with an import change.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from objdl.errors import ObjdlError

__all__ = [
    "OBJ_DOWNLOADER_CHANNEL",
    "OBJ_DOWNLOADER_TOPIC",
    "Consumer",
    "DownloadStatus",
    "InvalidStateError",
    "ProduceRC",
    "Producer",
    "RetryPolicy",
]

OBJ_DOWNLOADER_CHANNEL = "obj_downloader__"
OBJ_DOWNLOADER_TOPIC = "obj_downloader__download"


class _PropKey:
    REF_ID = "ref_id"
    STATE = "state"
    DATA = "data"
    STATUS = "status"
    ERROR = "error"
    CANCEL = "cancel"  # payload key (not in the seed): the site gives up, with a reason
    DIRECT = "direct"  # first reply's payload key (not in the seed): a direct link offer


class ProduceRC:
    """Return codes of :meth:`Producer.produce`."""

    OK = "ok"
    ERROR = "error"
    EOF = "eof"


class DownloadStatus:
    """The ``status`` passed to an object-downloaded callback."""

    SUCCESS = "success"
    FAILED = "failed"


class InvalidStateError(ObjdlError):
    """A producer was asked for something that cannot exist (offset outside the object).

    Raised by a producer, it makes the owner answer ``invalid_request`` with this
    text instead of ``process_exception``: the requester is at fault, not the owner.
    """


@dataclass(frozen=True)
class RetryPolicy:
    """How a site retries a request that timed out or could not reach the owner.

    Attributes:
        tries: attempts per request in all (1 = no retry).
        backoff: seconds before the first retry; doubled for each further one.
        backoff_max: the most any single wait grows to.
    """

    tries: int = 3
    backoff: float = 0.5
    backoff_max: float = 4.0

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"tries must be at least 1, got {self.tries}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("backoff and backoff_max must not be negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (2 = the first retry)."""
        return min(self.backoff * 2 ** max(0, attempt - 2), self.backoff_max)


class Producer(ABC):
    """Owner side: produces the next small piece of a large object on request."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(f"{type(self).__module__}.{type(self).__name__}")

    @abstractmethod
    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        """Produce a small object to be sent (on the owner's side).

        Args:
            ref_id: the ref id of the object being downloaded.
            obj: the large object.
            state: current state of downloading, received from the downloading site
                (None on the first request).
            requester: the FQCN of the site that is downloading, as stamped by the
                broker.

        Returns:
            ``(return code, a small object to be sent, new state to be sent)``.
        """

    def release(self, ref_id: str, obj: Any) -> None:  # noqa: B027 - optional hook
        """Called once when the ref is removed from its transaction; free what it held.

        Not in the seed: a no-op by default, so seed producers need not define it.
        """


class Consumer(ABC):
    """Site side: takes in the small pieces and ends the download.

    What :meth:`consume` receives is what the seed gave: ``data`` and ``state`` hold
    ``bytes`` (never a ``memoryview``) inside plain dicts and lists (a tuple the
    producer sent arrives as a list, as in the seed), and numpy arrays arrive
    writable, whatever their size. Getting them so costs one copy of each received
    buffer.

    A consumer that can work on the received memory itself sets the class attribute
    :attr:`accepts_views` to True: then every bytes-like of at least
    :data:`objdl.wire.BULK_THRESHOLD` bytes (64 KiB) arrives as a read-only
    ``memoryview`` over the received frame (smaller ones stay ``bytes``) and arrays as
    read-only views, with no copy. A view stays valid for as long as it is referenced;
    ``bytes(view)`` makes a copy to keep or change.
    """

    accepts_views: ClassVar[bool] = False
    """True: take received buffers as read-only memoryviews (no copy); False (the
    seed's behaviour, the default): as ``bytes``."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(f"{type(self).__module__}.{type(self).__name__}")

    @abstractmethod
    def consume(self, ref_id: str, state: dict, data: Any) -> dict:
        """Process received data; return the new state to send back to the owner.

        Args:
            ref_id: the ref id of the object being downloaded.
            state: the state the producer returned with this piece (None if none).
            data: the piece; ``bytes`` and containers of them, or read-only views
                when the class sets :attr:`accepts_views`.
        """

    @abstractmethod
    def download_completed(self, ref_id: str) -> None:
        """Called when the download finished successfully."""

    @abstractmethod
    def download_failed(self, ref_id: str, reason: str) -> None:
        """Called when the download ended unsuccessfully; `reason` says why."""
