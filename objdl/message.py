"""Messages exchanged between cells: headers, payload, return codes, and Signal.

A :class:`Message` is a dict of small headers plus a payload of any value the wire
codec carries (see :mod:`objdl.wire`). Replies carry a ``RETURN_CODE`` header; remote
trouble is reported that way, never raised (the seed's model).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = [
    "Message",
    "MessageHeaderKey",
    "MessageType",
    "ReturnCode",
    "Signal",
    "make_reply",
    "new_cell_message",
]


class MessageHeaderKey:
    """Names of headers: those objdl itself reads or writes, and the seed's
    application-level ones.

    ``MSG_ROOT_ID`` and ``MSG_ROOT_TTL`` are the seed framework's names for the id of
    the message that carried some refs (a job's task, say) and how long, in seconds,
    that message and what hangs off it stay relevant; its "via file" serialisers use
    them to tie a download transaction's lifetime to that message. objdl neither sets
    nor reads them: like any header a caller sets, they travel end to end unchanged,
    on requests, replies and fire-and-forget messages alike.
    """

    ORIGIN = "origin"
    DESTINATION = "destination"
    CHANNEL = "channel"
    TOPIC = "topic"
    REQ_ID = "req_id"
    MSG_TYPE = "msg_type"
    RETURN_CODE = "return_code"
    ERROR = "error"
    SECURE = "secure"
    OPTIONAL = "optional"
    MSG_ROOT_ID = "msg_root_id"
    MSG_ROOT_TTL = "msg_root_ttl"


class MessageType:
    """Values of the ``MSG_TYPE`` header."""

    REQUEST = "req"
    REPLY = "rep"
    FIRE = "fire"


class ReturnCode:
    """Values of the ``RETURN_CODE`` header of a reply.

    objdl itself never sends ``FILTER_ERROR`` (it has no message filters) or
    ``INVALID_SESSION`` (a cell whose session the broker does not know gets
    ``COMM_ERROR``); they keep the seed's names so seed-era code that names them, in
    a table that maps return codes for instance, runs unchanged, and a handler may
    answer with them.
    """

    OK = "ok"
    TIMEOUT = "timeout"
    INVALID_TARGET = "invalid_target"
    TARGET_UNREACHABLE = "target_unreachable"
    COMM_ERROR = "comm_error"
    MSG_TOO_BIG = "msg_too_big"
    INVALID_REQUEST = "invalid_request"
    PROCESS_EXCEPTION = "process_exception"
    AUTHENTICATION_ERROR = "authentication_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    ABORT_RUN = "abort_run"
    UNAUTHENTICATED = "unauthenticated"
    FILTER_ERROR = "filter_error"
    INVALID_SESSION = "invalid_session"


class Message:
    """Headers plus a payload.

    Args:
        headers: initial headers (copied); keys are str, values small scalars.
        payload: any value the wire codec can carry, bulk buffers included.
    """

    __slots__ = ("headers", "payload")

    def __init__(self, headers: dict[str, Any] | None = None, payload: Any = None) -> None:
        self.headers: dict[str, Any] = dict(headers) if headers else {}
        self.payload = payload

    def get_header(self, key: str, default: Any = None) -> Any:
        return self.headers.get(key, default)

    def set_header(self, key: str, value: Any) -> None:
        self.headers[key] = value

    def add_headers(self, headers: dict[str, Any]) -> None:
        self.headers.update(headers)

    def remove_header(self, key: str) -> Any:
        """Remove `key` and return its value (None when it was absent)."""
        return self.headers.pop(key, None)

    def __repr__(self) -> str:
        return f"Message(headers={self.headers!r}, payload={type(self.payload).__name__})"


def make_reply(rc: str, error: str = "", body: Any = None) -> Message:
    """A reply with return code `rc`, an optional error text and a payload `body`."""
    headers: dict[str, Any] = {MessageHeaderKey.RETURN_CODE: rc}
    if error:
        headers[MessageHeaderKey.ERROR] = error
    return Message(headers, body)


def new_cell_message(headers: dict[str, Any], payload: Any = None) -> Message:
    """A new message with a copy of `headers` and the given `payload` (not copied)."""
    return Message(headers, payload)


class Signal:
    """A one-shot flag with a value, waitable, so blocked calls can end when it fires.

    ``abort_signal`` arguments take one: a call waiting on the network returns
    ``ABORT_RUN`` as soon as another thread calls :meth:`trigger`.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: Any = None

    def trigger(self, value: Any = True) -> None:
        self._value = value
        self._event.set()

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    @property
    def value(self) -> Any:
        return self._value

    def reset(self, value: Any = None) -> None:
        self._value = value
        self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until triggered or `timeout` seconds pass; True when triggered."""
        return self._event.wait(timeout)
