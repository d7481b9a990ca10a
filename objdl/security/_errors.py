"""Exception types of objdl's security layer (all under :class:`objdl.errors.ObjdlError`)."""

from __future__ import annotations

from objdl.errors import CellError, ObjdlError

__all__ = ["AuthenticationError", "KeyFileError", "Rejected", "SecureUnavailableError"]


class KeyFileError(ObjdlError, ValueError):
    """A key, key file or allow-list is missing or malformed; the message names it.

    Also a :class:`ValueError`: it is raised for bad arguments, at once.
    """


class AuthenticationError(CellError):
    """The broker refused this cell's credentials: its key, or the name bound to it.

    Raised by :meth:`objdl.cell.Cell.start`; `reason` says what the broker or the
    handshake reported, and `kind` which of them refused, for code to act on (never
    the text): ``"key"`` (the broker turned the key away), ``"name"`` (the key was let
    in, but may not use this cell's name) or ``"handshake"`` (the CURVE handshake
    failed: a wrong broker key, or a broker without CURVE).
    """

    def __init__(self, broker_url: str, reason: str, kind: str = "key") -> None:
        super().__init__(
            f"the broker at {broker_url} refused this cell: {reason}; check the keys "
            "(this cell's curve_keys, the broker_public_key it was given, and the "
            "broker's --allowed-keys entry and names for this key: objdl keys list)"
        )
        self.broker_url = broker_url
        self.reason = reason
        self.kind = kind


class SecureUnavailableError(CellError, NotImplementedError):
    """``secure=True`` was asked for but cannot be honoured, so nothing was sent.

    This cell has no end-to-end keys, the peer's public key is unknown, or the
    ``cryptography`` package is missing. objdl never falls back to plaintext. It is
    also a :class:`NotImplementedError`, which is what versions of objdl without
    end-to-end encryption raised for ``secure=True``.
    """


class Rejected(ObjdlError):
    """A received message that must not be used; `kind` is why, for counting.

    Kinds: ``malformed`` (no valid seal), ``unknown_peer`` (no key for the origin),
    ``auth`` (does not authenticate), ``replay`` (seen before, or too old),
    ``unknown_session`` (authentic, but sealed for another session of this cell: it
    restarted since), ``first_contact`` (authentic, but the sender did not know this
    cell's session yet). Only for the last two, `peer_session` is the sender's
    session the message came from.
    """

    def __init__(self, kind: str, reason: str, peer_session: bytes | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.peer_session = peer_session
