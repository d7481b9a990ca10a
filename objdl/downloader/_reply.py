"""What a site accepts from an owner in the sized exchange: every field checked, once.

How it works: the owner is untrusted, so nothing in its replies is used before it
is checked here, by pure functions that return typed values or raise
:class:`BadReply` with a reason that names the field:

- the first reply's ``state`` is the object's description; :func:`parse_descriptor`
  turns it into a :class:`Descriptor` (size, chunk, algo, digest, meta) or refuses
  it, so the rest of the download never meets a wrong type;
- every chunk's ``data`` goes through :func:`chunk_pieces`: bytes-like buffers only,
  flat and contiguous;
- every later reply's ``state`` goes through :func:`check_chunk_state`: it says where
  the chunk ends, and it may not describe the object differently;
- every reply's return code and error text go through :func:`reply_error` (cut and
  escaped), and an ``ok`` reply's body through :func:`reply_payload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from objdl._logutil import peer_text
from objdl.downloader._defs import ProduceRC, _PropKey
from objdl.downloader.sized import DIGESTS, MAX_CHUNK_SIZE, new_hash
from objdl.message import Message, MessageHeaderKey, ReturnCode

__all__ = [
    "MAX_META_BYTES",
    "MAX_SIZE",
    "BadReply",
    "Descriptor",
    "check_chunk_state",
    "chunk_pieces",
    "parse_descriptor",
    "reply_error",
    "reply_payload",
    "request_failed",
    "shorten",
]

# The owner's `meta` is a small note (a file's name); a site holds it for the whole
# download, so it is bounded whatever fits in one message.
MAX_META_BYTES = 64 * 1024
_MAX_META_DEPTH = 16
MAX_SIZE = 2**63 - 1  # an offset must fit a signed 64-bit file offset
_DESC_KEYS = ("size", "chunk", "algo", "digest")
_HEX = frozenset("0123456789abcdef")
_HEX_LEN = {algo: 2 * new_hash(algo).digest_size for algo in DIGESTS}
_MAX_REASON = 500  # characters of an owner's error text kept in a reason
_MAX_CODE = 64  # characters of an owner's return code kept (ours are under 30)


class BadReply(ValueError):
    """A reply from the owner that the site refuses; the text says which field and why."""


def shorten(value: Any, limit: int = 200) -> str:
    """`value`'s repr cut to `limit` characters, for reasons and logs (the owner chose it)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Descriptor:
    """An object's description, as checked: the types and ranges below hold."""

    size: int  # 0 <= size <= MAX_SIZE
    chunk: int  # 1 <= chunk <= MAX_CHUNK_SIZE: the most the owner serves per request
    algo: str  # one of DIGESTS
    digest: str  # lowercase hex (as hexdigest() gives it), as long as `algo`'s digests
    meta: Any  # None or plain msgpack values, at most MAX_META_BYTES

    def as_state(self) -> dict[str, Any]:
        """The description as the seed-style dict consumers get (``resume_from``)."""
        return {
            "offset": 0,
            "size": self.size,
            "chunk": self.chunk,
            "algo": self.algo,
            "digest": self.digest,
            "meta": self.meta,
        }


def parse_descriptor(state: Any) -> Descriptor:
    """Check the first reply's `state` and return it typed; raise BadReply if it is wrong."""
    if not isinstance(state, dict):
        raise BadReply(f"the first reply's state must describe the object, got {shorten(state)}")
    missing = [k for k in _DESC_KEYS if k not in state]
    if missing:
        raise BadReply(f"the object's description lacks {', '.join(missing)}")
    size, chunk, algo, digest = (state[k] for k in _DESC_KEYS)
    if not _is_int(size) or not 0 <= size <= MAX_SIZE:
        raise BadReply(f"size must be an int in [0, 2**63), got {shorten(size)}")
    if not _is_int(chunk) or not 1 <= chunk <= MAX_CHUNK_SIZE:
        raise BadReply(f"chunk must be an int in [1, {MAX_CHUNK_SIZE}], got {shorten(chunk)}")
    if not isinstance(algo, str) or algo not in DIGESTS:
        raise BadReply(f"algo must be one of {DIGESTS}, got {shorten(algo)}")
    if not isinstance(digest, str):
        raise BadReply(f"digest must be a hex str, got {shorten(digest)}")
    if len(digest) != _HEX_LEN[algo] or not _HEX.issuperset(digest):
        raise BadReply(
            f"digest must be {_HEX_LEN[algo]} lowercase hex digits for {algo}, "
            f"got {shorten(digest)}"
        )
    offset = state.get("offset", 0)
    if not _is_int(offset) or offset != 0:
        raise BadReply(f"the first reply's offset must be 0, got {shorten(offset)}")
    meta = state.get("meta")
    _check_meta(meta)
    return Descriptor(size, chunk, algo, digest, meta)


def _check_meta(meta: Any) -> None:
    """Refuse a meta that is not plain data, nests too deep or is too big (walks it once)."""
    budget = MAX_META_BYTES
    stack: list[tuple[Any, int]] = [(meta, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_META_DEPTH:
            raise BadReply(f"meta nests deeper than {_MAX_META_DEPTH} levels")
        if isinstance(value, (str, bytes, bytearray, memoryview)):
            budget -= len(value) if not isinstance(value, memoryview) else value.nbytes
        elif value is None or isinstance(value, (bool, int, float)):
            budget -= 8
        elif isinstance(value, (list, tuple)):
            budget -= 8
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            budget -= 8
            for k, v in value.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        else:
            raise BadReply(f"meta may hold only plain values, found a {type(value).__name__}")
        if budget < 0:
            raise BadReply(f"meta is larger than {MAX_META_BYTES} bytes")


def chunk_pieces(data: Any) -> list[memoryview]:
    """A chunk's `data` as flat byte views: one bytes-like buffer, a list of them, or None.

    Anything else (an int, a str, a dict, a list holding one) raises BadReply.
    """
    if data is None:
        return []
    items = data if isinstance(data, (list, tuple)) else (data,)
    pieces = []
    for item in items:
        if isinstance(item, (str, list, tuple, dict)):  # str has no buffer; nesting is junk
            raise BadReply(f"chunk data must be bytes or a list of bytes, got {shorten(item)}")
        try:
            view = memoryview(item)
        except TypeError:
            raise BadReply(
                f"chunk data must be bytes or a list of bytes, got type {type(item).__name__}"
            ) from None
        if not view.c_contiguous:
            raise BadReply("chunk data must be contiguous buffers")
        try:
            pieces.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        except (TypeError, ValueError) as exc:
            raise BadReply(f"chunk data is not a plain buffer: {exc}") from None
    return pieces


def check_chunk_state(state: Any, desc: Descriptor, offset: int, n: int) -> None:
    """Check a chunk reply's `state`: it must say the chunk ends at ``offset + n``.

    A state that describes the object differently from the first reply is refused
    too: the owner may not change size, chunk or digest halfway.
    """
    if not isinstance(state, dict):
        raise BadReply(f"the reply for offset {offset} has state {shorten(state)}, not a dict")
    end = state.get("offset")
    if not _is_int(end) or end != offset + n:
        raise BadReply(
            f"the reply for [{offset}, {offset + n}) says it ends at {shorten(end)}, "
            f"not at {offset + n}: an answer to another request"
        )
    for key in _DESC_KEYS:
        if key not in state:
            continue
        said, was = state[key], getattr(desc, key)
        if type(said) is not type(was) or said != was:  # (an array's != is no bool)
            raise BadReply(
                f"the object's {key} changed mid-download: was {shorten(was)}, now {shorten(said)}"
            )


def reply_error(reply: Message) -> tuple[str, str] | None:
    """None if `reply` says ``ok``; else its return code and error text, cut and escaped.

    The owner chose both texts, so they are bounded and made printable here.
    """
    rc = reply.get_header(MessageHeaderKey.RETURN_CODE)
    if rc == ReturnCode.OK:
        return None
    rc = peer_text(rc, _MAX_CODE) if isinstance(rc, str) else shorten(rc)
    error = reply.get_header(MessageHeaderKey.ERROR) or ""
    error = peer_text(error, _MAX_REASON) if isinstance(error, str) else shorten(error)
    return rc, error


def request_failed(owner: str, attempt: int, elapsed: str, rc: str, error: str) -> str:
    """The reason for a request the owner refused, or that ran out of tries."""
    tries = f" after {attempt} tries" if attempt > 1 else ""
    return f"error requesting data from {owner}{tries} ({elapsed}): {rc}" + (
        f": {error}" if error else ""
    )


def reply_payload(reply: Message, owner: str, elapsed: str) -> dict:
    """An ``ok`` reply's payload, its status ``ok`` or ``eof``; raise BadReply if not."""
    payload = reply.payload
    if not isinstance(payload, dict):
        raise BadReply(f"owner {owner} sent a reply without a payload dict")
    status = payload.get(_PropKey.STATUS)
    if not isinstance(status, str):
        raise BadReply(f"owner {owner} sent a status that is not a str: {shorten(status)}")
    if status == ProduceRC.ERROR:
        error = payload.get(_PropKey.ERROR) or "no reason given"
        error = peer_text(error, _MAX_REASON) if isinstance(error, str) else shorten(error)
        raise BadReply(f"producer error at {owner} after {elapsed}: {error}")
    if status not in (ProduceRC.OK, ProduceRC.EOF):
        raise BadReply(f"owner {owner} sent unknown status {shorten(status)}")
    return payload
