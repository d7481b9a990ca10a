"""The receiving side of ``secure=True``: open sealed messages, refuse what fails.

Sealed requests are opened on a handler thread, sealed replies on the I/O thread; a
message that does not authenticate is never handed on. A requester whose sealed
request was refused is told why, in plaintext (there is nothing to protect).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from objdl import wire
from objdl._logutil import RateLimitedLog
from objdl.cell._pending import PendingRequest, Sealed, Waiters
from objdl.errors import WireError
from objdl.message import Message, MessageHeaderKey, MessageType, ReturnCode, make_reply
from objdl.security import Rejected

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = ["Opener"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
SendReply = Callable[[Message, Message, str, bool], None]
Drop = Callable[..., None]


class Opener:
    """Opens and checks the sealed messages one cell receives.

    Args:
        name: the cell's name.
        e2e: its end-to-end keys (None: it cannot open anything, and says so).
        stats, stats_lock: the cell's counters (``rejected_secure``).
        waiters: the cell's requests in flight.
        send_reply: ``send_reply(reply, request, origin, secure)``.
        drop: counts and logs a malformed message: ``drop(key, fmt, *args)``.
    """

    def __init__(
        self,
        name: str,
        e2e: EndToEnd | None,
        stats: dict[str, int],
        stats_lock: threading.Lock,
        waiters: Waiters,
        send_reply: SendReply,
        drop: Drop,
    ) -> None:
        self._name = name
        self.e2e = e2e
        self._stats = stats
        self._stats_lock = stats_lock
        self._waiters = waiters
        self._send_reply = send_reply
        self._drop = drop
        self._rlog = RateLimitedLog(log)

    def open_request(self, job: Sealed, origin: str) -> Message | None:
        """Open a sealed request or fire (handler thread); None if it must not run."""
        assert self.e2e is not None
        try:
            plain = self.e2e.open(origin, job.frames)
        except Rejected as exc:
            self.rejected(origin, exc.reason)
            self.answer_rejected(job.headers, origin, exc.reason)
            return None
        try:
            msg = wire.decode(plain)
        except WireError as exc:
            self._drop("decode", "undecodable secure message from %s: %s", origin, exc)
            if job.headers.get(_H.MSG_TYPE) == MessageType.REQUEST:
                err = make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}")
                self._send_reply(err, Message(job.headers), origin, True)
            return None
        msg.headers[_H.ORIGIN] = origin
        return msg

    def open_reply(self, frames: list[zmq.Frame], waiter: PendingRequest, origin: str) -> None:
        """Open a sealed reply (I/O thread) and hand it to `waiter`, or what went wrong."""
        assert self.e2e is not None
        try:
            msg = wire.decode(self.e2e.open(origin, frames[2:]))
        except Rejected as exc:
            self.rejected(origin, exc.reason)
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"the reply from {origin} was rejected: {exc}"
            )
        except WireError as exc:
            self._drop("decode", "undecodable secure reply from %s: %s", origin, exc)
            return  # as for a plaintext reply that does not decode: the request times out
        else:
            msg.headers[_H.ORIGIN] = origin
            reply = msg
        self._waiters.forget(waiter.req_id)
        waiter.resolve(reply)

    def rejected(self, origin: str, reason: str) -> None:
        with self._stats_lock:
            self._stats["rejected_secure"] += 1
        self._rlog.log(
            logging.WARNING,
            "secure",
            "cell %s rejected a secure message from %s: %s",
            self._name,
            origin,
            reason,
        )

    def answer_rejected(self, headers: dict[str, Any], origin: str, reason: str) -> None:
        """Tell a requester (in plaintext: there is nothing to protect) why its request failed."""
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST and isinstance(
            headers.get(_H.REQ_ID), int
        ):
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"cell {self._name} rejected the request: {reason}"
            )
            self._send_reply(reply, Message(headers), origin, False)

    def refuse(self, headers_frame: zmq.Frame, origin: str) -> bool:
        """If the message is marked secure, refuse it (this cell cannot open it): True."""
        try:
            headers = wire.decode_headers(headers_frame)
        except WireError:
            return False
        if not headers.get(_H.SECURE):
            return False
        why = "this cell cannot open secure messages: it has no curve_keys and peer_keys"
        self.rejected(origin, why)
        self.answer_rejected(headers, origin, why)
        return True

    @staticmethod
    def unsealed(reply: Message, origin: str) -> Message:
        """What a secure request gets for a plaintext reply: its error code, nothing more."""
        rc = reply.get_header(_H.RETURN_CODE)
        if rc is None or rc == ReturnCode.OK:
            return make_reply(
                ReturnCode.AUTHENTICATION_ERROR,
                f"the reply from {origin} to a secure request was not sealed",
            )
        return Message(
            {
                _H.RETURN_CODE: rc,
                _H.ERROR: str(reply.get_header(_H.ERROR, "")),
                _H.ORIGIN: origin,
            }
        )
