"""The receiving side of ``secure=True``: open sealed messages, refuse what fails.

Sealed requests are opened on a handler thread, sealed replies on the I/O thread; a
message that does not authenticate is never handed on. A requester whose sealed
request was refused is told why with an ``authentication_error`` reply whose
``auth_reason`` header is a code (:data:`REASONS`). It is plaintext (there is nothing
to protect), except for ``unknown_session``: that one is sealed and bound to the
request, because on it the requester resends the request once, to the session the
reply came from, and a broker must not be able to trigger that resend.
"""

from __future__ import annotations

import contextlib
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
from objdl.security import Rejected, SecureUnavailableError

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = ["AUTH_REASON", "NO_KEYS", "REASONS", "UNKNOWN_SESSION", "Opener"]

AUTH_REASON = "auth_reason"
"""Header of an ``authentication_error`` reply from a receiver: why it refused."""
UNKNOWN_SESSION = "unknown_session"
FIRST_CONTACT = "first_contact"  # a Rejected kind only: answered as UNKNOWN_SESSION
NO_KEYS = "no_keys"
REASONS = frozenset(("malformed", "unknown_peer", "auth", "replay", UNKNOWN_SESSION, NO_KEYS))
"""Values of :data:`AUTH_REASON`: a ``Rejected`` kind (``first_contact`` is answered as
``unknown_session``: the sender does the same for both), or ``no_keys``."""

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
SendReply = Callable[[Message, Message, str, "bytes | bool"], None]
Drop = Callable[..., None]
Resend = Callable[[PendingRequest], None]


class Opener:
    """Opens and checks the sealed messages one cell receives.

    Args:
        name: the cell's name.
        e2e: its end-to-end keys (None: it cannot open anything, and says so).
        stats, stats_lock: the cell's counters (``rejected_secure``).
        waiters: the cell's requests in flight.
        send_reply: ``send_reply(reply, request, origin, seal)`` (seal: False for
            plaintext, else the SEAL of the request answered).
        drop: counts and logs a malformed message: ``drop(key, fmt, *args)``.
        resend: seals a waiting request again and queues it (I/O thread).
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
        resend: Resend,
    ) -> None:
        self._name = name
        self.e2e = e2e
        self._stats = stats
        self._stats_lock = stats_lock
        self._waiters = waiters
        self._send_reply = send_reply
        self._drop = drop
        self._resend = resend
        self._rlog = RateLimitedLog(log)

    def open_request(self, job: Sealed, origin: str) -> Message | None:
        """Open a sealed request or fire (handler thread); None if it must not run."""
        assert self.e2e is not None
        try:
            plain = self.e2e.open(origin, job.frames)
        except Rejected as exc:
            if exc.kind == FIRST_CONTACT:  # the handshake, not an attack: not counted
                log.debug("cell %s: %s", self._name, exc.reason)
                self._answer_unknown_session(job, origin, exc.reason)
                return None
            self.rejected(origin, exc.reason)
            if exc.kind == UNKNOWN_SESSION:
                self._answer_unknown_session(job, origin, exc.reason)
            else:
                self.answer_rejected(job.headers, origin, exc.reason, exc.kind)
            return None
        try:
            msg = wire.decode(plain)
        except WireError as exc:
            self._drop("decode", "undecodable secure message from %s: %s", origin, exc)
            if job.headers.get(_H.MSG_TYPE) == MessageType.REQUEST:
                err = make_reply(ReturnCode.INVALID_REQUEST, f"request did not decode: {exc}")
                self._send_reply(err, Message(job.headers), origin, job.seal)
            return None
        msg.headers[_H.ORIGIN] = origin
        return msg

    def _answer_unknown_session(self, job: Sealed, origin: str, reason: str) -> None:
        """An authentic request for another session of this cell: a sealed, bound refusal."""
        if job.headers.get(_H.MSG_TYPE) != MessageType.REQUEST or not isinstance(
            job.headers.get(_H.REQ_ID), int
        ):
            return  # a fire has nothing to answer to; it is counted and logged
        reply = make_reply(ReturnCode.AUTHENTICATION_ERROR, f"cell {self._name}: {reason}")
        reply.set_header(AUTH_REASON, UNKNOWN_SESSION)
        self._send_reply(reply, Message(job.headers), origin, job.seal)

    def open_reply(self, frames: list[zmq.Frame], waiter: PendingRequest, origin: str) -> None:
        """Open a sealed reply (I/O thread) and hand it to `waiter`, or what went wrong.

        A reply refused as a replay or as sealed for another session of this cell is
        not for this request (a broker replays it, or a recorded reply of an earlier
        life of this cell reuses its req_id): it is dropped and the request waits on.
        A sealed ``unknown_session`` refusal makes the request go once more, to the
        session it came from.
        """
        assert self.e2e is not None
        try:
            msg = wire.decode(self.e2e.open(origin, frames[2:], waiter.seal, waiter.first_seal))
        except Rejected as exc:
            if exc.kind == "superseded":  # e.g. a duplicate of the refusal that caused the resend
                log.debug("cell %s: %s", self._name, exc.reason)
                return
            self.rejected(origin, exc.reason)
            if exc.kind in ("replay", UNKNOWN_SESSION, FIRST_CONTACT):
                return
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"the reply from {origin} was rejected: {exc}"
            )
            reply.set_header(AUTH_REASON, exc.kind)
        except WireError as exc:
            self._drop("decode", "undecodable secure reply from %s: %s", origin, exc)
            return  # as for a plaintext reply that does not decode: the request times out
        else:
            if (
                msg.get_header(_H.RETURN_CODE) == ReturnCode.AUTHENTICATION_ERROR
                and msg.get_header(AUTH_REASON) == UNKNOWN_SESSION
                and waiter.plain is not None
                and not waiter.resent
            ):
                waiter.resent = True
                waiter.first_seal = waiter.seal
                # Bound to the request just sent: that session is the current one. (A
                # key that went away meanwhile is reported by the resend.)
                with contextlib.suppress(SecureUnavailableError, ValueError):
                    self.e2e.adopt(origin, frames[2:])
                with self._stats_lock:
                    self._stats["resent_secure"] += 1
                self._resend(waiter)
                return
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

    def answer_rejected(self, headers: dict[str, Any], origin: str, reason: str, code: str) -> None:
        """Tell a requester (in plaintext: there is nothing to protect) why its request failed.

        `code` goes in the :data:`AUTH_REASON` header. Each refused request gets one
        small reply, sent back to the connection it came from: no amplification, and
        nothing a broker could not have forged itself.
        """
        if headers.get(_H.MSG_TYPE) == MessageType.REQUEST and isinstance(
            headers.get(_H.REQ_ID), int
        ):
            reply = make_reply(
                ReturnCode.AUTHENTICATION_ERROR, f"cell {self._name} rejected the request: {reason}"
            )
            reply.set_header(AUTH_REASON, code)
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
        self.answer_rejected(headers, origin, why, NO_KEYS)
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
        unsealed = Message(
            {
                _H.RETURN_CODE: rc,
                _H.ERROR: str(reply.get_header(_H.ERROR, "")),
                _H.ORIGIN: origin,
            }
        )
        reason = reply.get_header(AUTH_REASON)
        if reason in REASONS:  # informational only: nothing acts on an unsealed reason
            unsealed.set_header(AUTH_REASON, reason)
        return unsealed
