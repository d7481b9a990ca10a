"""Objects whose size is known up front: served by offset, checked by digest.

How it works (the "sized" exchange, carried in the seed's ``state`` dict):

1. first request, state ``None`` or ``{"length": L}``: the owner answers with the
   object's description ``{"offset": 0, "size", "chunk", "algo", "digest", "meta"}``
   and the first chunk as data;
2. chunk request ``{"offset": o, "length": L}``: the bytes at ``[o, o + L)`` (clipped
   to the object and to the chunk limit) and ``{"offset": o + n}``; any chunk, in any
   order, by any number of sites at once, so a site can keep a window of requests
   in flight;
3. final request ``{"offset": size, "ok": bool, "reason": str}``: EOF when ok (the
   owner's downloaded callback gets SUCCESS), ERROR otherwise (FAILED).

A plain seed-style consumer that echoes ``{"offset": o + n}`` works too (one chunk at a
time). Offsets outside the object raise :class:`InvalidStateError`, which the owner
answers with ``invalid_request``. The site hashes chunks in offset order as they
arrive and compares with the owner's digest before it reports success.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from objdl._logutil import peer_text
from objdl.downloader._defs import Consumer, InvalidStateError, Producer, ProduceRC

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_DIGEST",
    "DEFAULT_WINDOW",
    "DIGESTS",
    "INLINE_DIGESTS",
    "MAX_CHUNK_SIZE",
    "OrderedDigest",
    "SizedConsumer",
    "SizedProducer",
    "SizedSource",
    "as_pieces",
    "new_hash",
]

# Chosen by benchmarks/bench_download.py (docs/PERFORMANCE.md): 2 MiB x 8 in flight
# was the fastest, and the closest to the bare relay, on 1 to 8 sites; it bounds a
# download's data in flight to 16 MiB.
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
DEFAULT_WINDOW = 8
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_DIGEST = "xxh3_128"
DIGESTS = ("xxh3_128", "sha256", "blake2b")
# Cheap enough (about 20 us per MiB) to hash on the receiving thread; the others
# cost 0.6 ms (sha256 with SHA-NI) to 1.1 ms (blake2b) per MiB and get a thread.
INLINE_DIGESTS = frozenset({"xxh3_128"})
_RELEASED_MAX = 100_000
_OPEN_WAIT = 600.0  # the longest a request waits for another thread to hash an object
_HASH_WAIT = 60.0  # the longest hexdigest() waits for background hashing to catch up


def _check_algo(algo: str) -> str:
    if algo not in DIGESTS:
        raise ValueError(f"digest must be one of {DIGESTS}, got {algo!r}")
    return algo


def new_hash(algo: str) -> Any:
    """A fresh hash object for one of :data:`DIGESTS` (``update``, ``hexdigest``).

    ``xxh3_128`` (the default) is a 128-bit non-cryptographic hash from the xxhash
    library, about 30 times cheaper than sha256: it catches corruption (any change
    goes undetected with odds of 2**-128), not tampering, which the transport's
    CurveZMQ and ``secure=True`` messages guard against (see docs/SECURITY.md).
    Choose ``sha256`` to compare with a digest published elsewhere.
    """
    if _check_algo(algo) == "xxh3_128":
        return xxhash.xxh3_128()
    return hashlib.new(algo)


def as_pieces(data: Any) -> list[memoryview]:
    """Chunk data as a list of flat byte views (a chunk may be one buffer or several)."""
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return [memoryview(p).cast("B") for p in data]
    return [memoryview(data).cast("B")]


def _nbytes(pieces: Iterable[memoryview]) -> int:
    return sum(p.nbytes for p in pieces)


class SizedSource(ABC):
    """An object's bytes, readable at any offset; opened once per ref and shared."""

    size: int = 0
    meta: Any = None

    @abstractmethod
    def read(self, offset: int, length: int) -> Any:
        """Bytes ``[offset, offset + length)``: one buffer or a list of buffers."""

    def close(self) -> None:  # noqa: B027 - optional
        """Free what the source holds (file descriptors, maps)."""

    def digest(self, algo: str) -> str:
        """Hex digest of all the bytes, read in chunks (override if known already)."""
        h = new_hash(algo)
        for off in range(0, self.size, DEFAULT_CHUNK_SIZE):
            for piece in as_pieces(self.read(off, min(DEFAULT_CHUNK_SIZE, self.size - off))):
                h.update(piece)
        return h.hexdigest()


class _Prepared:
    __slots__ = ("desc", "source")

    def __init__(self, source: SizedSource, desc: dict[str, Any]) -> None:
        self.source = source
        self.desc = desc


class SizedProducer(Producer):
    """Serves sized objects by offset; subclasses say how to open an object.

    Args:
        chunk_size: the largest chunk served (a site may ask for less).
        digest: ``"xxh3_128"`` (default), ``"sha256"`` or ``"blake2b"`` (see
            :func:`new_hash`).
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, digest: str = DEFAULT_DIGEST) -> None:
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")
        self.chunk_size = chunk_size
        self.algo = _check_algo(digest)
        self._prepared: dict[str, _Prepared] = {}
        self._opening: dict[str, threading.Event] = {}
        # Released refs, so a request that raced the release cannot reopen (and leak)
        # the object; an insertion-ordered dict used as a bounded set.
        self._released: dict[str, None] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def open_source(self, ref_id: str, obj: Any) -> SizedSource:
        """Open `obj` for reading (called once per ref)."""

    def prepare(self, ref_id: str, obj: Any) -> dict[str, Any]:
        """Open the object and compute its digest now, not on the first request.

        Called by the offer helpers so that a large file's digest is not computed
        while a site's first request waits. Returns the description sent to sites.
        """
        return self._get(ref_id, obj).desc

    def _get(self, ref_id: str, obj: Any) -> _Prepared:
        # Opening and hashing run outside the lock, so preparing a new object never
        # stalls requests for objects already being served; concurrent first
        # requests for one ref wait for the thread that opens it.
        with self._lock:
            prepared = self._prepared.get(ref_id)
            if prepared is not None:
                return prepared
            if ref_id in self._released:
                raise InvalidStateError(f"object {ref_id} is no longer offered")
            opening = self._opening.get(ref_id)
            mine = opening is None
            if opening is None:
                opening = self._opening[ref_id] = threading.Event()
        if not mine:
            if not opening.wait(_OPEN_WAIT):
                raise TimeoutError(f"object {ref_id} still being opened after {_OPEN_WAIT:g}s")
            with self._lock:
                prepared = self._prepared.get(ref_id)
            if prepared is None:
                raise RuntimeError(f"object {ref_id} could not be opened (see the owner's log)")
            return prepared
        try:
            source = self.open_source(ref_id, obj)
            try:
                desc = {
                    "offset": 0,
                    "size": source.size,
                    "chunk": self.chunk_size,
                    "algo": self.algo,
                    "digest": source.digest(self.algo),
                    "meta": source.meta,
                }
            except BaseException:
                source.close()
                raise
            prepared = _Prepared(source, desc)
            with self._lock:
                released = ref_id in self._released
                if not released:
                    self._prepared[ref_id] = prepared
            if released:  # released while we opened it: nobody would close it later
                source.close()
                raise InvalidStateError(f"object {ref_id} is no longer offered")
            return prepared
        finally:
            with self._lock:
                self._opening.pop(ref_id, None)
            opening.set()

    def release(self, ref_id: str, obj: Any) -> None:
        with self._lock:
            prepared = self._prepared.pop(ref_id, None)
            self._released[ref_id] = None
            if len(self._released) > _RELEASED_MAX:
                del self._released[next(iter(self._released))]
        if prepared is not None:
            prepared.source.close()

    def produce(self, ref_id: str, obj: Any, state: dict, requester: str) -> tuple[str, Any, dict]:
        prepared = self._get(ref_id, obj)
        desc, source = prepared.desc, prepared.source
        size = desc["size"]
        state = state or {}
        length = state.get("length", self.chunk_size)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidStateError(f"chunk length must be a positive int, got {length!r}")
        length = min(length, self.chunk_size)
        if "offset" not in state:
            data = source.read(0, min(length, size)) if size else b""
            return ProduceRC.OK, data, dict(desc)
        offset = state["offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= size:
            raise InvalidStateError(f"offset {offset!r} is outside the object (size {size})")
        if offset == size:
            if state.get("ok", True) is False:
                reason = peer_text(str(state.get("reason", "the site reported a failure")), 500)
                self.logger.warning("site %s failed ref %s: %s", requester, ref_id, reason)
                return ProduceRC.ERROR, reason, {}
            return ProduceRC.EOF, None, {}
        n = min(length, size - offset)
        return ProduceRC.OK, source.read(offset, n), {"offset": offset + n}


class OrderedDigest:
    """Hashes chunks in offset order while they may arrive out of order.

    A chunk ahead of the next offset is kept (a view, not a copy) until the gap
    before it fills; the window bounds how many are kept.

    With `background`, the hashing itself runs on a thread of its own, so a site
    hashes one chunk while it writes the next (hashlib releases the GIL for large
    buffers): worth it for the costly digests (sha256, blake2b), whose hashing would
    otherwise hold up the writes. ``upto`` counts the bytes received in order,
    ``hashed`` those hashed; `on_hashed` (if given) is called on the hashing thread
    after each step. Call :meth:`close` when done with a background digest;
    :meth:`hexdigest` waits for the hashing to catch up.
    """

    def __init__(
        self,
        algo: str,
        background: bool = False,
        on_hashed: Callable[[], None] | None = None,
    ) -> None:
        self._h = new_hash(algo)
        self.upto = 0
        self._held: dict[int, list[memoryview]] = {}
        self._hashed = 0
        self._on_hashed = on_hashed
        self.error: BaseException | None = None
        self._jobs: queue.SimpleQueue[list[memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()
        if background:
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="objdl-digest", daemon=True)
            self._thread.start()

    @property
    def hashed(self) -> int:
        """Bytes hashed so far (equal to ``upto`` unless hashing in the background)."""
        return self._hashed if self._jobs is not None else self.upto

    def add(self, offset: int, pieces: list[memoryview]) -> None:
        if offset != self.upto:
            self._held[offset] = pieces
            return
        while True:
            if self._jobs is not None:
                self._jobs.put(pieces)
            else:
                for p in pieces:
                    self._h.update(p)
            self.upto += _nbytes(pieces)
            nxt = self._held.pop(self.upto, None)
            if nxt is None:
                return
            pieces = nxt

    def _run(self) -> None:
        assert self._jobs is not None
        while True:
            pieces = self._jobs.get()
            if pieces is None:
                return
            if self.error is None:
                try:
                    for p in pieces:
                        self._h.update(p)
                except Exception as exc:  # surfaced by hexdigest() and wait()
                    self.error = exc
                with self._progress:
                    self._hashed += _nbytes(pieces)
                    self._progress.notify_all()
            del pieces
            if self._on_hashed is not None:
                self._on_hashed()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every byte received in order is hashed."""
        end = time.monotonic() + timeout
        with self._progress:
            while self.hashed < self.upto and self.error is None:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._progress.wait(min(left, 0.5))
        if self.error is not None:
            raise RuntimeError(f"hashing failed: {self.error!r}") from self.error
        return self.hashed >= self.upto

    def hexdigest(self, timeout: float = _HASH_WAIT) -> str:
        """The digest of the bytes received in order (waits for background hashing)."""
        if not self.wait(timeout):
            raise TimeoutError(f"hashing did not catch up within {timeout:g}s")
        return self._h.hexdigest()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the hashing thread once it has hashed what it was given (idempotent, bounded)."""
        if self._jobs is not None and self._thread is not None:
            self._jobs.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout)
            self._thread = None


class SizedConsumer(Consumer):
    """Receives a sized object chunk by chunk, in any order, at its offsets.

    Subclasses implement :meth:`begin` and :meth:`write` (and the seed's
    ``download_completed``/``download_failed``). :func:`download_object` gives a
    SizedConsumer a window of requests in flight and checks the digest before
    ``download_completed``; :meth:`consume` also supports the seed's one-at-a-time
    exchange, checking the digest when the last byte arrives.

    :meth:`write` gets the received frames themselves, as read-only memoryviews
    (``accepts_views`` is True): a chunk goes from the socket to its destination
    without a copy.
    """

    accepts_views = True

    def __init__(self) -> None:
        super().__init__()
        self._seed_digest: OrderedDigest | None = None
        self._seed_desc: dict[str, Any] = {}

    @abstractmethod
    def begin(self, ref_id: str, size: int, meta: Any) -> None:
        """Get ready for `size` bytes (e.g. allocate or create the temporary file)."""

    @abstractmethod
    def write(self, offset: int, pieces: list[memoryview]) -> None:
        """Store the chunk that starts at `offset` (the pieces follow each other)."""

    def resume_from(self, ref_id: str, desc: dict[str, Any]) -> int:
        """How many leading bytes of the object described by `desc` are already here.

        Called before :meth:`begin`; a consumer that returns N > 0 has reopened what
        it kept (and :meth:`begin` is not called): the download re-reads those N
        bytes with :meth:`read` to hash them, then asks for the rest. Default: 0.
        """
        return 0

    def read(self, offset: int, length: int) -> bytes:
        """Bytes already stored at `offset` (needed only by consumers that resume)."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume")

    def verified(self, upto: int) -> None:
        """Every byte before `upto` is stored and hashed: a point to resume from.

        An exception raised here ends the download in ``download_failed``.
        """

    def data_rejected(self, ref_id: str) -> None:
        """The bytes stored for `ref_id` failed the digest check: none may be kept.

        Called just before ``download_failed`` when the download knows the stored
        data is bad (a digest mismatch), so a consumer that keeps partial data to
        resume from discards it rather than resume from it. Default: nothing.
        """

    def consume(self, ref_id: str, state: dict, data: Any) -> dict:
        pieces = as_pieces(data)
        if "size" in state:
            self._seed_desc = state
            self._seed_digest = OrderedDigest(state["algo"])
            self.begin(ref_id, state["size"], state.get("meta"))
        if self._seed_digest is None:
            raise InvalidStateError("the owner's first reply did not describe the object")
        offset = self._seed_digest.upto
        self.write(offset, pieces)
        self._seed_digest.add(offset, pieces)
        end = self._seed_digest.upto
        if end == self._seed_desc["size"]:
            got = self._seed_digest.hexdigest()
            if got != self._seed_desc["digest"]:
                self.data_rejected(ref_id)
                raise ValueError(
                    f"digest mismatch: owner's {self._seed_desc['algo']} is "
                    f"{self._seed_desc['digest']}, received bytes hash to {got}"
                )
        return {"offset": end}
