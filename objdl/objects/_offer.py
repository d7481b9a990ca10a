"""The owner's one-call helpers: offer bytes, a file or a dict, get a ref id back."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from objdl.cell import CellLike
from objdl.downloader import DEFAULT_CHUNK_SIZE, ObjDownloader, SizedProducer, SizedSource
from objdl.downloader._owner import is_secure as _is_secure
from objdl.downloader._owner import producer_of
from objdl.downloader._tables import new_id
from objdl.downloader.sized import DEFAULT_DIGEST
from objdl.objects._bytes import BytesSource
from objdl.objects._dict import DictSource
from objdl.objects._file import FileSource

__all__ = [
    "DEFAULT_TX_TIMEOUT",
    "ObjectProducer",
    "new_transaction",
    "offer_bytes",
    "offer_dict",
    "offer_file",
]

DEFAULT_TX_TIMEOUT = 60.0


class ObjectProducer(SizedProducer):
    """Serves bytes-likes, files (given as :class:`pathlib.Path`) and dicts, by offset."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, digest: str = DEFAULT_DIGEST) -> None:
        super().__init__(chunk_size, digest)
        # Sources an offer helper opened itself (a file opened relative to a folder
        # descriptor, say), each taken by the one open_source call of its ref.
        self._opened: dict[str, SizedSource] = {}
        self._opened_lock = threading.Lock()

    def prepare_opened(self, ref_id: str, obj: Any, source: SizedSource | None) -> None:
        """:meth:`prepare` `ref_id`, serving it from `source` if given (already opened).

        If preparing fails before `source` is taken, it stays the caller's to close.
        """
        if source is not None:
            with self._opened_lock:
                self._opened[ref_id] = source
        try:
            self.prepare(ref_id, obj)  # open and hash now, not while a site waits
        finally:
            with self._opened_lock:
                self._opened.pop(ref_id, None)

    def open_source(self, ref_id: str, obj: Any) -> SizedSource:
        with self._opened_lock:
            opened = self._opened.pop(ref_id, None)
        if opened is not None:
            return opened
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return BytesSource(obj)
        if isinstance(obj, Path):
            return FileSource(obj)
        if isinstance(obj, dict):
            return DictSource(obj)
        raise TypeError(
            f"cannot offer a {type(obj).__name__}: offer bytes-likes, a pathlib.Path or a dict"
        )


def new_transaction(
    cell: CellLike,
    *,
    timeout: float = DEFAULT_TX_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: str = DEFAULT_DIGEST,
    timeout_cb: Callable[..., Any] | None = None,
    sites: Iterable[str] | None = None,
    num_sites: int | None = None,
    min_sites: int | None = None,
    allowed_sites: Iterable[str] | None = None,
    done_cb: Callable[..., Any] | None = None,
    progress_cb: Callable[..., Any] | None = None,
    secure: bool = False,
    **cb_kwargs: Any,
) -> str:
    """Start a transaction that the ``offer_*`` helpers can join; return its id.

    Group objects that belong together (a model file and its config, say) so they
    share one inactivity timeout and one ``timeout_cb(tx_id, objs, **cb_kwargs)``.
    `sites`, `num_sites`, `min_sites`, `allowed_sites`, `done_cb` and `progress_cb`
    are as for :meth:`ObjDownloader.track_transaction`; read the outcome with
    ``ObjDownloader.get_outcome(tx_id)``. With `secure`, its objects are served only
    to sealed requests (sites download with ``secure=True``); others get
    ``authentication_error``.
    """
    if not isinstance(secure, bool):
        raise TypeError(f"secure must be a bool, got {type(secure).__name__}")
    tx_id = ObjDownloader.new_transaction(
        cell, ObjectProducer(chunk_size, digest), timeout, timeout_cb=timeout_cb, **cb_kwargs
    )
    tracked = (sites, num_sites, min_sites, allowed_sites, done_cb, progress_cb)
    if secure or any(v is not None for v in tracked):
        try:
            ObjDownloader.track_transaction(
                tx_id,
                sites=sites,
                num_sites=num_sites,
                min_sites=min_sites,
                allowed_sites=allowed_sites,
                done_cb=done_cb,
                progress_cb=progress_cb,
                secure=secure,
            )
        except BaseException:
            ObjDownloader.delete_transaction(tx_id)
            raise
    return tx_id


def _offer(
    cell: CellLike,
    obj: Any,
    transaction_id: str | None,
    timeout: float,
    chunk_size: int,
    digest: str,
    timeout_cb: Callable[..., Any] | None,
    obj_downloaded_cb: Callable[..., Any] | None,
    cb_kwargs: dict[str, Any],
    secure: bool,
    source: SizedSource | None = None,
) -> tuple[str, str]:
    if not isinstance(secure, bool):
        raise TypeError(f"secure must be a bool, got {type(secure).__name__}")
    if transaction_id is None:
        transaction_id = new_transaction(
            cell,
            timeout=timeout,
            chunk_size=chunk_size,
            digest=digest,
            timeout_cb=timeout_cb,
            secure=secure,
            **cb_kwargs,
        )
    elif secure and producer_of(transaction_id) is not None and not _is_secure(transaction_id):
        raise ValueError(
            f"transaction {transaction_id!r} is not secure: make it with "
            "new_transaction(..., secure=True) to offer objects with secure=True"
        )
    producer = producer_of(transaction_id)
    if producer is None:
        raise ValueError(f"no such transaction {transaction_id!r} (deleted or timed out?)")
    if not isinstance(producer, ObjectProducer):
        raise ValueError(
            f"transaction {transaction_id!r} serves with {type(producer).__name__}, not "
            "ObjectProducer; make it with objdl.objects.new_transaction"
        )
    ref_id = new_id("R")
    producer.prepare_opened(ref_id, obj, source)
    try:
        ObjDownloader.add_download_object(
            transaction_id, obj, ref_id=ref_id, obj_downloaded_cb=obj_downloaded_cb, **cb_kwargs
        )
    except BaseException:
        producer.release(ref_id, obj)
        raise
    return transaction_id, ref_id


def offer_bytes(
    cell: CellLike,
    data: bytes | bytearray | memoryview,
    *,
    transaction_id: str | None = None,
    timeout: float = DEFAULT_TX_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: str = DEFAULT_DIGEST,
    timeout_cb: Callable[..., Any] | None = None,
    obj_downloaded_cb: Callable[..., Any] | None = None,
    secure: bool = False,
    **cb_kwargs: Any,
) -> str:
    """Offer `data` for download from `cell`; return its ref id.

    Joins `transaction_id` if given (one made by an ``offer_*`` helper), otherwise
    starts a transaction that ends after `timeout` idle seconds. The callbacks and
    `cb_kwargs` are the seed's (see :class:`ObjDownloader`). `data` is served as
    slices of itself: do not change it while it is offered. With `secure`, it is
    served only to sealed requests (a new transaction is made secure; a given one
    must be).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"offer_bytes needs bytes, bytearray or memoryview, got {type(data).__name__}"
        )
    return _offer(
        cell,
        data,
        transaction_id,
        timeout,
        chunk_size,
        digest,
        timeout_cb,
        obj_downloaded_cb,
        cb_kwargs,
        secure,
    )[1]


def offer_file(
    cell: CellLike,
    path: str | os.PathLike[str],
    *,
    transaction_id: str | None = None,
    timeout: float = DEFAULT_TX_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: str = DEFAULT_DIGEST,
    timeout_cb: Callable[..., Any] | None = None,
    obj_downloaded_cb: Callable[..., Any] | None = None,
    secure: bool = False,
    dir_fd: int | None = None,
    follow_symlinks: bool = True,
    **cb_kwargs: Any,
) -> str:
    """Offer the file at `path` for download; return its ref id.

    The file is opened and hashed now; it must not change while offered (a change of
    size fails the downloads in progress, any other change their digest check).

    `dir_fd` and `follow_symlinks` are as for :func:`os.open` (see
    :class:`FileSource`): ``offer_file(cell, name, dir_fd=folder_fd,
    follow_symlinks=False)`` opens `name` in that folder and fails rather than follow
    a symlink found there, so a link swapped in after the caller checked the name is
    never served. The descriptor is only used during the call.

    Raises:
        FileNotFoundError / IsADirectoryError / PermissionError: `path` is not a
            readable file.
        OSError: (``ELOOP``) `path` is a symlink and `follow_symlinks` is False.
    """
    if not isinstance(follow_symlinks, bool):
        raise TypeError(f"follow_symlinks must be a bool, got {type(follow_symlinks).__name__}")
    p = Path(path)
    try:
        source = FileSource(p, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot offer {p}: no such file") from None
    except (ValueError, IsADirectoryError):
        raise IsADirectoryError(f"cannot offer {p}: not a regular file") from None
    try:
        return _offer(
            cell,
            p,
            transaction_id,
            timeout,
            chunk_size,
            digest,
            timeout_cb,
            obj_downloaded_cb,
            cb_kwargs,
            secure,
            source,
        )[1]
    except BaseException:
        source.close()  # idempotent: a no-op if the producer took and closed it
        raise


def offer_dict(
    cell: CellLike,
    data: dict,
    *,
    transaction_id: str | None = None,
    timeout: float = DEFAULT_TX_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: str = DEFAULT_DIGEST,
    timeout_cb: Callable[..., Any] | None = None,
    obj_downloaded_cb: Callable[..., Any] | None = None,
    secure: bool = False,
    **cb_kwargs: Any,
) -> str:
    """Offer a dict (str keys; values bytes, numpy arrays or msgpack-able) for download.

    Arrays are served from their own memory: do not change them while offered.

    Raises:
        TypeError: a key that is not a str, or a value the codec cannot carry.
    """
    if not isinstance(data, dict):
        raise TypeError(f"offer_dict needs a dict, got {type(data).__name__}")
    return _offer(
        cell,
        data,
        transaction_id,
        timeout,
        chunk_size,
        digest,
        timeout_cb,
        obj_downloaded_cb,
        cb_kwargs,
        secure,
    )[1]
