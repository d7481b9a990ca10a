"""End-to-end encryption between two cells: pair keys, sealing, opening, replay checks.

How it works. Each cell has a CURVE (Curve25519) key pair and knows its peers'
public keys. Each :class:`EndToEnd` (one per cell, so one per process life) also
draws a **session id** when it is made: 12 bytes, 4 of the wall clock in seconds and
8 random. A message is sealed for the pair (sender session, receiver session); both
sides derive its key as

    shared  = X25519(own secret, peer public)                 # static-static
    key     = HKDF-SHA256(shared, salt=MAGIC,
                          info=MAGIC|sender pub|receiver pub|sender name|receiver name
                               |sender session|receiver session)

A sealed message keeps the frame layout ``[headers, body, *buffers]``:

    headers  plaintext (the receiver's cell reads channel, topic, req_id), with
             ``secure: True``; authenticated, not encrypted
    body     SEAL (version 2 | sender session | receiver session | counter, 33 bytes)
             + ChaCha20-Poly1305(body)
    buffer i ChaCha20-Poly1305(buffer i)

Frame i (1 = body) is encrypted under nonce ``counter (8 bytes) | i (4 bytes)``
with associated data ``i | frame count | SEAL | origin | destination | in reply to |
headers frame``, where "in reply to" is the SEAL of the request a reply answers
(empty for requests and fires): a flipped bit anywhere, a swapped, dropped or added
frame, a message re-addressed or re-stamped by the broker, a reply handed to another
request, all fail authentication.

Sessions (the handshake). A receiver opens only messages addressed to its *own*
current session. A sender learns a peer's session from any message of that peer
that authenticates (the newest by start time wins); until it knows one it addresses
the all-zero session. A message that authenticates but is addressed to another
session (first contact, or a receiver that restarted since) is refused as
``unknown_session``, and the refusal tells the caller the sender's session, so the
receiving cell can answer with a *sealed* ``authentication_error`` bound to the
request: from it the sender learns the receiver's session and resends once. So a
message recorded before a receiver restarted never opens after it.

Replays within a session: per (peer, sender session) the receiver keeps the highest
counter and a 1024-wide bitmap below it; a counter seen before, or older than the
window, is refused. A session enters the table only after a message in it
authenticated. Memory is bounded: at most ``sessions_per_peer`` sessions per peer
(least recently used forgotten) and ``max_peers`` peers. A forgotten session cannot
come back: the peer remembers the newest start time among its forgotten sessions and
refuses any unknown session that did not start later. Counters are per destination
and never reset, whatever session they are addressed to, so no key ever sees a nonce
twice.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from objdl.security._errors import KeyFileError, Rejected, SecureUnavailableError
from objdl.security._keys import KeyPair, PeerKeys
from objdl.security._seal import NO_SESSION, SEAL_LEN, SESSION_LEN, VERSION, seal_of
from objdl.security._seal import view_of as _view

__all__ = [
    "NO_SESSION",
    "SEAL_LEN",
    "SESSION_LEN",
    "WINDOW",
    "EndToEnd",
    "Outbound",
    "ReplayWindow",
    "seal_of",
]

WINDOW = 1024
_TAG_LEN = 16  # Poly1305
_MAGIC = b"objdl-e2e-2"
_KEYS_PER_PEER = 4  # sealing keys an Outbound keeps (one per receiver session)
_U32 = struct.Struct(">I")
_FLOOR_IDS_MAX = 1024
_MAX_FRAME = 2**31 - 1  # the AEAD's limit per call
_STALE = "a session older than those this cell forgot (replay)"


class ReplayWindow:
    """Highest counter seen and a bitmap of the `width` counters below it."""

    __slots__ = ("_mask", "bits", "highest", "width")

    def __init__(self, width: int = WINDOW) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, not {width!r}")
        self.width = width
        self._mask = (1 << width) - 1
        self.highest = -1
        self.bits = 0  # bit k set: counter highest - k was seen

    def check(self, counter: int) -> str:
        """``""`` if `counter` is new and inside the window, else why it is refused."""
        if counter > self.highest:
            return ""
        offset = self.highest - counter
        if offset >= self.width:
            return f"counter {counter} is older than the replay window"
        if (self.bits >> offset) & 1:
            return f"counter {counter} was seen before (replay)"
        return ""

    def mark(self, counter: int) -> None:
        """Record `counter` (which :meth:`check` accepted) as seen."""
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & self._mask if shift < self.width else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _nonce(counter: int, index: int) -> bytes:
    return counter.to_bytes(8, "big") + _U32.pack(index)


def _common_ad(
    seal: bytes, origin: str, dest: str, count: int, headers: bytes, in_reply_to: bytes
) -> bytes:
    return (
        _U32.pack(count)
        + seal
        + _lp(origin.encode())
        + _lp(dest.encode())
        + _lp(in_reply_to)
        + headers
    )


def _start(session: bytes) -> int:
    return int.from_bytes(session[:4], "big")


class Outbound:
    """This cell's stream of sealed messages to one receiver, in counter order.

    It seals for the receiver's session it last learned (:meth:`learn`), or for one
    given (a reply goes to the session of the request it answers). The counter runs
    on across sessions, so a key never sees a nonce twice.
    """

    def __init__(
        self,
        derive: Callable[[bytes], ChaCha20Poly1305],
        session: bytes,
        origin: str,
        dest: str,
        peer_key: bytes,
    ) -> None:
        self._derive = derive  # receiver session -> key
        self._keys: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()
        self.session = session
        self.peer_session = NO_SESSION
        self.origin = origin
        self.dest = dest
        self.peer_key = peer_key
        self._counter = 0
        self._lock = threading.Lock()

    def learn(self, peer_session: bytes, force: bool = False) -> bool:
        """Address the receiver's `peer_session` from now on, unless a newer one is known.

        `force`: even if it looks older (the peer's clock stepped back): for a
        session proven current, by a sealed refusal of a request just sent.
        """
        with self._lock:
            if peer_session == self.peer_session or peer_session == NO_SESSION:
                return False
            if (
                not force
                and self.peer_session != NO_SESSION
                and _start(peer_session) < _start(self.peer_session)
            ):
                return False  # an older life of the peer (a late or replayed message)
            self.peer_session = peer_session
            return True

    def seal(
        self,
        frames: Sequence[Any],
        deliver: Callable[[list[Any]], None] | None = None,
        *,
        in_reply_to: bytes = b"",
    ) -> list[Any]:
        """Seal ``[headers, body, *buffers]``; return the sealed frames.

        `deliver`, if given, is called with them before the next message can be
        sealed, so the order it sees is the counter order (the receiver's replay
        window then never sees this sender's messages out of order). With
        `in_reply_to` (the SEAL of a request), the message is a reply bound to that
        request and addressed to the session the request came from.

        Raises:
            ValueError: fewer than 2 frames, a frame of 2 GiB or more, or a bad
                `in_reply_to`.
        """
        if len(frames) < 2:
            raise ValueError("a message needs at least a headers and a body frame")
        if in_reply_to and len(in_reply_to) != SEAL_LEN:
            raise ValueError(f"in_reply_to must be a {SEAL_LEN}-byte seal")
        views = [_view(f) for f in frames]
        if any(v.nbytes > _MAX_FRAME - _TAG_LEN - SEAL_LEN for v in views):
            raise ValueError("a secure message cannot carry a frame of 2 GiB or more")
        headers = bytes(views[0])
        with self._lock:
            to = in_reply_to[1 : 1 + SESSION_LEN] if in_reply_to else self.peer_session
            aead = self._keys.get(to)
            if aead is None:
                aead = self._keys[to] = self._derive(to)
                while len(self._keys) > _KEYS_PER_PEER:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(to)
            counter = self._counter
            self._counter += 1
            seal = bytes([VERSION]) + self.session + to + counter.to_bytes(8, "big")
            common = _common_ad(seal, self.origin, self.dest, len(views), headers, in_reply_to)
            # The body is small (bulk bytes are buffers): one copy to prepend the seal is cheap.
            first = seal + aead.encrypt(_nonce(counter, 1), views[1], _U32.pack(1) + common)
            out: list[Any] = [frames[0], first]
            for i in range(2, len(views)):
                out.append(aead.encrypt(_nonce(counter, i), views[i], _U32.pack(i) + common))
            if deliver is not None:
                deliver(out)
        return out


class _Session:
    __slots__ = ("aead", "window")

    def __init__(self, aead: ChaCha20Poly1305, width: int) -> None:
        self.aead = aead
        self.window = ReplayWindow(width)


class _Peer:
    """What a receiver remembers of one sending peer."""

    __slots__ = ("floor", "floor_ids", "key", "sessions")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self.floor = -1  # start time (s) of the newest forgotten session
        self.floor_ids: set[bytes] = set()  # forgotten sessions that started at `floor`

    def stale(self, session: bytes) -> bool:
        start = int.from_bytes(session[:4], "big")
        return start < self.floor or (start == self.floor and session in self.floor_ids)

    def add(self, session: bytes, state: _Session, cap: int) -> None:
        self.sessions[session] = state
        while len(self.sessions) > cap:
            self._forget(self.sessions.popitem(last=False)[0])

    def new_key(self, key: bytes) -> None:
        for session in self.sessions:
            self._forget(session)
        self.sessions.clear()
        self.key = key

    def _forget(self, session: bytes) -> None:
        start = int.from_bytes(session[:4], "big")
        if start > self.floor:
            self.floor, self.floor_ids = start, {session}
        elif start == self.floor:
            self.floor_ids.add(session)
            if len(self.floor_ids) > _FLOOR_IDS_MAX:
                self.floor, self.floor_ids = start + 1, set()


class EndToEnd:
    """One cell's end-to-end state: its key, its peers' keys, sessions both ways.

    Thread-safe: any thread may seal (through :meth:`outbound`) and open.

    Args:
        fqcn: this cell's name.
        keypair: this cell's CURVE key pair.
        peers: where peers' public keys come from.
        window: width of the replay window, in messages.
        max_peers: peers whose sessions are remembered (least recently used go).
        sessions_per_peer: sessions remembered per peer.
        wall_clock, random_bytes: for this cell's session id (tests pass their own).
    """

    def __init__(
        self,
        fqcn: str,
        keypair: KeyPair,
        peers: PeerKeys,
        *,
        window: int = WINDOW,
        max_peers: int = 4096,
        sessions_per_peer: int = 4,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.fqcn = fqcn
        self._private = X25519PrivateKey.from_private_bytes(z85.decode(keypair.secret))
        self._public = z85.decode(keypair.public)
        self._peers = peers
        self._window = window
        self._max_peers = max_peers
        self._per_peer = sessions_per_peer
        self.session = (int(wall_clock()) & 0xFFFFFFFF).to_bytes(4, "big") + random_bytes(8)
        self._lock = threading.Lock()
        self._shared: OrderedDict[bytes, bytes] = OrderedDict()
        self._out: OrderedDict[str, Outbound] = OrderedDict()
        self._in: OrderedDict[str, _Peer] = OrderedDict()
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "opened",
                "malformed",
                "unknown_peer",
                "auth",
                "replay",
                "unknown_session",
                "first_contact",
                "superseded",
            ),
            0,
        )

    # -- sending -------------------------------------------------------------------

    def peer_key(self, name: str) -> tuple[bytes | None, str]:
        """The public key known for `name` and ``""``, or None and why there is none."""
        return self._peers.lookup(name)

    def require_peer(self, name: str) -> bytes:
        """The public key for `name`.

        Raises:
            SecureUnavailableError: there is none (or several), so nothing may be sent.
        """
        key, why = self._peers.lookup(name)
        if key is None:
            raise SecureUnavailableError(
                f"secure=True to {name!r}: {why} in {self._peers.where} "
                f"(add its public key, e.g. objdl keys allow {name} --dir DIR --pub FILE); "
                "refusing rather than sending plaintext"
            )
        return key

    def outbound(self, dest: str) -> Outbound:
        """The stream that seals this cell's messages to `dest` (made on first use).

        Raises:
            SecureUnavailableError: no public key for `dest`.
            KeyFileError: that key is not usable.
        """
        key = self.require_peer(dest)
        with self._lock:
            out = self._out.get(dest)
            if out is not None and out.peer_key == key:
                self._out.move_to_end(dest)
                return out
        try:
            self._shared_secret(key)
        except ValueError as exc:
            raise KeyFileError(f"the public key for {dest!r} is not usable: {exc}") from None
        peer_public = z85.decode(key)

        def derive(peer_session: bytes) -> ChaCha20Poly1305:
            return self._session_key(
                key, self.fqcn, dest, self._public, peer_public, self.session + peer_session
            )

        out = Outbound(derive, self.session, self.fqcn, dest, key)
        with self._lock:
            raced = self._out.get(dest)
            if raced is not None and raced.peer_key == key:
                return raced
            self._out[dest] = out
            while len(self._out) > self._max_peers:
                self._out.popitem(last=False)  # a new stream replaces it if it comes back
        return out

    def knows_session(self, dest: str) -> bool:
        """True once this cell has learned `dest`'s current session (from a message of it)."""
        with self._lock:
            out = self._out.get(dest)
        return out is not None and out.peer_session != NO_SESSION

    def adopt(self, dest: str, sealed: Sequence[Any]) -> None:
        """Address the session that sealed `sealed` (an opened refusal from `dest`) from now on."""
        seal = seal_of(sealed)
        if len(seal) == SEAL_LEN:
            self.outbound(dest).learn(seal[1 : 1 + SESSION_LEN], force=True)

    def _learn(self, origin: str, key: bytes, peer_session: bytes) -> None:
        """`origin` (whose key is `key`) is alive in `peer_session`: address that from now on."""
        with self._lock:
            out = self._out.get(origin)
        if out is None:
            try:
                out = self.outbound(origin)
            except (SecureUnavailableError, KeyFileError):
                return
        if out.peer_key == key:
            out.learn(peer_session)

    # -- receiving -----------------------------------------------------------------

    def open(
        self,
        origin: str,
        frames: Sequence[Any],
        in_reply_to: bytes = b"",
        superseded: bytes = b"",
    ) -> list[Any]:
        """Check and decrypt a sealed ``[headers, body, *buffers]`` from `origin`.

        Args:
            in_reply_to: for a reply, the SEAL of the request it must answer.
            superseded: for a reply, the SEAL of an earlier try of that request (it
                was refused and resent): a reply to that is ``superseded``.

        Returns:
            ``[headers, body, *buffers]`` in plaintext, for :func:`objdl.wire.decode`.

        Raises:
            Rejected: the message must be dropped; ``kind`` and ``reason`` say why.
                For ``unknown_session`` and ``first_contact`` (addressed to no session
                at all) the message did authenticate and ``peer_session`` is the
                session it came from (so it may be answered).
        """
        try:
            return self._open(origin, frames, in_reply_to, superseded)
        except Rejected as exc:
            with self._lock:
                self.stats[exc.kind] += 1
            raise

    def _open(
        self, origin: str, frames: Sequence[Any], in_reply_to: bytes, superseded: bytes
    ) -> list[Any]:
        views = [_view(f) for f in frames]
        if len(views) < 2 or views[1].nbytes < SEAL_LEN + _TAG_LEN or views[1][0] != VERSION:
            raise Rejected("malformed", "marked secure but carries no valid seal")
        seal = bytes(views[1][:SEAL_LEN])
        session, to = seal[1 : 1 + SESSION_LEN], seal[1 + SESSION_LEN : 1 + 2 * SESSION_LEN]
        counter = int.from_bytes(seal[1 + 2 * SESSION_LEN :], "big")
        key, why = self._peers.lookup(origin)
        if key is None:
            raise Rejected("unknown_peer", f"cannot check a secure message from {origin!r}: {why}")
        if to != self.session and in_reply_to:
            # A reply to an earlier life of this cell (a restarted requester reuses
            # req_ids): not for any request waiting now, and never answered.
            raise Rejected(
                "unknown_session",
                f"a secure reply from {origin!r} was sealed for another session of "
                f"cell {self.fqcn} (one before it restarted: a recorded reply)",
            )
        if to != self.session:
            # Sealed before this cell's session began (it restarted), or before the
            # sender knew it. Authenticate it all the same, so that only a real peer
            # is answered and taught this session; never keep state for it.
            aead = self._receive_key(key, origin, session, to)
            self._decrypt(aead, seal, counter, origin, views, in_reply_to)
            self._learn(origin, key, session)
            if to == NO_SESSION:
                why = f"{origin!r} does not know the session of cell {self.fqcn} yet"
                raise Rejected("first_contact", why, peer_session=session)
            raise Rejected(
                "unknown_session",
                f"a secure message from {origin!r} was sealed for another session of "
                f"cell {self.fqcn} (it restarted since; or a recorded message is replayed)",
                peer_session=session,
            )
        with self._lock:
            peer = self._in.get(origin)
            known = peer.sessions.get(session) if peer is not None and peer.key == key else None
            if known is not None:
                self._check_window(known, counter)
                aead = known.aead
            elif peer is not None and peer.key == key and peer.stale(session):
                raise Rejected("replay", _STALE)
        if known is None:
            aead = self._receive_key(key, origin, session, to)
        try:
            plain = self._decrypt(aead, seal, counter, origin, views, in_reply_to)
        except Rejected:
            if not superseded:
                raise
            self._decrypt(aead, seal, counter, origin, views, superseded)  # raises if not
            raise Rejected(
                "superseded", f"a reply from {origin!r} to an earlier try of this request"
            ) from None
        with self._lock:
            peer = self._in.get(origin)
            if peer is None:
                peer = self._in[origin] = _Peer(key)
                while len(self._in) > self._max_peers:
                    self._in.popitem(last=False)
            elif peer.key != key:
                peer.new_key(key)
            self._in.move_to_end(origin)
            state = peer.sessions.get(session)
            if state is None:
                if peer.stale(session):
                    raise Rejected("replay", _STALE)
                state = _Session(aead, self._window)
                peer.add(session, state, self._per_peer)
            else:
                peer.sessions.move_to_end(session)
            self._check_window(state, counter)  # again: another thread may have taken it
            state.window.mark(counter)
            self.stats["opened"] += 1
        self._learn(origin, key, session)
        return [frames[0], *plain]

    def _receive_key(self, key: bytes, origin: str, session: bytes, to: bytes) -> ChaCha20Poly1305:
        try:
            return self._session_key(
                key, origin, self.fqcn, z85.decode(key), self._public, session + to
            )
        except ValueError as exc:
            why = f"the key for {origin!r} is unusable: {exc}"
            raise Rejected("unknown_peer", why) from None

    @staticmethod
    def _check_window(state: _Session, counter: int) -> None:
        why = state.window.check(counter)
        if why:
            raise Rejected("replay", why)

    def _decrypt(
        self,
        aead: ChaCha20Poly1305,
        seal: bytes,
        counter: int,
        origin: str,
        views: list[memoryview],
        in_reply_to: bytes,
    ) -> list[bytes]:
        common = _common_ad(seal, origin, self.fqcn, len(views), bytes(views[0]), in_reply_to)
        try:
            out = [aead.decrypt(_nonce(counter, 1), views[1][SEAL_LEN:], _U32.pack(1) + common)]
            for i in range(2, len(views)):
                out.append(aead.decrypt(_nonce(counter, i), views[i], _U32.pack(i) + common))
        except (InvalidTag, ValueError, OverflowError):
            raise Rejected(
                "auth", f"a secure message from {origin!r} failed authentication"
            ) from None
        return out

    # -- keys ----------------------------------------------------------------------

    def _session_key(
        self,
        peer_key: bytes,
        sender: str,
        receiver: str,
        sender_pub: bytes,
        receiver_pub: bytes,
        sessions: bytes,
    ) -> ChaCha20Poly1305:
        info = (
            _MAGIC
            + _lp(sender_pub)
            + _lp(receiver_pub)
            + _lp(sender.encode())
            + _lp(receiver.encode())
            + sessions
        )
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_MAGIC, info=info)
        return ChaCha20Poly1305(hkdf.derive(self._shared_secret(peer_key)))

    def _shared_secret(self, peer_key: bytes) -> bytes:
        with self._lock:
            shared = self._shared.get(peer_key)
            if shared is not None:
                self._shared.move_to_end(peer_key)
                return shared
        # Raises ValueError for a low-order point (an all-zero shared secret).
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(z85.decode(peer_key)))
        with self._lock:
            self._shared[peer_key] = shared
            while len(self._shared) > self._max_peers:
                self._shared.popitem(last=False)
        return shared
