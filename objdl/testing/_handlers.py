"""A fake cell's request handlers: the registry, admission and the call, as the real pool's.

The real cell admits a request on its I/O thread (``service_unavailable`` once
``max_pending`` wait) and runs it on a pool thread; here nothing queues, so admission
counts the handlers running at once, on whatever threads deliver. The call itself
follows the real pool's rules: None is an empty OK reply, a Message without a return
code gets ``ok``, anything else or an exception is ``process_exception``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from objdl.cell import RequestCallback
from objdl.message import Message, MessageHeaderKey, ReturnCode, make_reply

__all__ = ["AUTH_REASON", "Handlers", "no_keys_reply", "unsealed"]

log = logging.getLogger("objdl.testing")

_H = MessageHeaderKey
AUTH_REASON = "auth_reason"
"""Header of an ``authentication_error`` reply saying why (the real cell's name for it)."""


class Handlers:
    """The handlers of one fake cell and the count of those running."""

    def __init__(self, name: str, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._name = name
        self._max_pending = max_pending
        self._table: dict[tuple[str, str], tuple[RequestCallback, tuple, dict]] = {}
        self._cond = threading.Condition()
        self._running = 0  # handlers running now, on any thread
        self._mine = threading.local()  # of those, on this thread

    def register(
        self, channel: str, topic: str, cb: RequestCallback, args: tuple, kwargs: dict
    ) -> None:
        with self._cond:
            self._table[(channel, topic)] = (cb, args, kwargs)

    def admit(self) -> bool:
        """Count one more handler running, unless `max_pending` already are."""
        with self._cond:
            if self._running >= self._max_pending:
                return False
            self._running += 1
        self._mine.depth = getattr(self._mine, "depth", 0) + 1
        return True

    def done(self) -> None:
        self._mine.depth -= 1
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` real seconds for the handlers running on other threads."""
        mine = getattr(self._mine, "depth", 0)
        with self._cond:
            self._cond.wait_for(lambda: self._running <= mine, timeout)

    def run(self, request: Message, channel: Any, topic: Any, origin: str) -> Message:
        """Call the handler of (channel, topic); its reply, or the error reply."""
        with self._cond:
            entry = self._table.get((channel, topic))
        if entry is None:
            log.warning("cell %s: no handler for %s/%s from %s", self._name, channel, topic, origin)
            return make_reply(
                ReturnCode.INVALID_REQUEST,
                f"cell {self._name} has no handler for channel {channel!r} topic {topic!r}",
            )
        cb, args, kwargs = entry
        try:
            result = cb(request, *args, **kwargs)
            if result is None:
                return make_reply(ReturnCode.OK)
            if isinstance(result, Message):
                if result.get_header(_H.RETURN_CODE) is None:
                    result.set_header(_H.RETURN_CODE, ReturnCode.OK)
                return result
            raise TypeError(
                f"handler for {channel}/{topic} returned {type(result).__name__}, "
                "expected a Message or None"
            )
        except Exception as exc:
            log.warning(
                "cell %s: handler for %s/%s raised", self._name, channel, topic, exc_info=True
            )
            return make_reply(ReturnCode.PROCESS_EXCEPTION, f"{type(exc).__name__}: {exc}")


def no_keys_reply(name: str) -> Message:
    """The refusal a cell without end-to-end keys sends for a secure request."""
    why = "this cell cannot open secure messages: it has no curve_keys and peer_keys"
    reply = make_reply(ReturnCode.AUTHENTICATION_ERROR, f"cell {name} rejected the request: {why}")
    reply.set_header(AUTH_REASON, "no_keys")
    return reply


def unsealed(reply: Message, origin: str) -> Message:
    """What a secure request gets for a plaintext reply: its error code, nothing more."""
    rc = reply.get_header(_H.RETURN_CODE)
    if rc is None or rc == ReturnCode.OK:
        return make_reply(
            ReturnCode.AUTHENTICATION_ERROR,
            f"the reply from {origin} to a secure request was not sealed",
        )
    out = Message(
        {_H.RETURN_CODE: rc, _H.ERROR: str(reply.get_header(_H.ERROR, "")), _H.ORIGIN: origin}
    )
    reason = reply.get_header(AUTH_REASON)
    if isinstance(reason, str):
        out.set_header(AUTH_REASON, reason)
    return out
