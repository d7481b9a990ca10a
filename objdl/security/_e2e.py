"""End-to-end encryption between two cells: pair keys, sealing, opening, replay checks.

How it works. Each cell has a CURVE (Curve25519) key pair and knows its peers'
public keys. For each (sender, receiver, session) both sides derive one key:

    shared  = X25519(own secret, peer public)                 # static-static
    key     = HKDF-SHA256(shared, salt=MAGIC,
                          info=MAGIC|sender pub|receiver pub|sender name|receiver name|session)

A session is the sender's stream of messages to one receiver: a 12-byte id (4 bytes
of the sender's clock in seconds, 8 random bytes), created the first time the
sender seals for that receiver, with a counter from 0. A sealed message keeps the
frame layout ``[headers, body, *buffers]``:

    headers  plaintext (the receiver's cell reads channel, topic, req_id), with
             ``secure: True``; authenticated, not encrypted
    body     SEAL (version 1 | session id | counter, 21 bytes) + ChaCha20-Poly1305(body)
    buffer i ChaCha20-Poly1305(buffer i)

Frame i (1 = body) is encrypted under nonce ``counter (8 bytes) | i (4 bytes)``
with associated data ``i | frame count | SEAL | origin | destination | headers
frame``: a flipped bit anywhere, a swapped, dropped or added frame, a message
re-addressed or re-stamped by the broker, all fail authentication.

Replays: per (peer, session) the receiver keeps the highest counter and a
1024-wide bitmap below it; a counter seen before, or older than the window, is
refused. A session enters the table only after a message in it authenticated.
Memory is bounded: at most ``sessions_per_peer`` sessions per peer (least
recently used forgotten) and ``max_peers`` peers. A forgotten session cannot come
back: the peer remembers the newest start time among its forgotten sessions and
refuses any unknown session that did not start later.
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

__all__ = [
    "SEAL_LEN",
    "SESSION_LEN",
    "WINDOW",
    "EndToEnd",
    "Outbound",
    "ReplayWindow",
]

VERSION = 1
SESSION_LEN = 12
SEAL_LEN = 1 + SESSION_LEN + 8
WINDOW = 1024
_TAG_LEN = 16  # Poly1305
_MAGIC = b"objdl-e2e-1"
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


def _view(frame: Any) -> memoryview:
    buffer = getattr(frame, "buffer", None)
    view = buffer if isinstance(buffer, memoryview) else memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _nonce(counter: int, index: int) -> bytes:
    return counter.to_bytes(8, "big") + _U32.pack(index)


def _common_ad(seal: bytes, origin: str, dest: str, count: int, headers: bytes) -> bytes:
    return _U32.pack(count) + seal + _lp(origin.encode()) + _lp(dest.encode()) + headers


class Outbound:
    """One sender -> receiver session: seals messages in counter order."""

    def __init__(
        self, aead: ChaCha20Poly1305, session: bytes, origin: str, dest: str, peer_key: bytes
    ) -> None:
        self._aead = aead
        self.session = session
        self.origin = origin
        self.dest = dest
        self.peer_key = peer_key
        self._counter = 0
        self._lock = threading.Lock()

    def seal(
        self,
        frames: Sequence[Any],
        deliver: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Seal ``[headers, body, *buffers]``; return the sealed frames.

        `deliver`, if given, is called with them before the next message can be
        sealed, so the order it sees is the counter order (the receiver's replay
        window then never sees this sender's messages out of order).

        Raises:
            ValueError: fewer than 2 frames, or a frame of 2 GiB or more.
        """
        if len(frames) < 2:
            raise ValueError("a message needs at least a headers and a body frame")
        views = [_view(f) for f in frames]
        if any(v.nbytes > _MAX_FRAME - _TAG_LEN - SEAL_LEN for v in views):
            raise ValueError("a secure message cannot carry a frame of 2 GiB or more")
        headers = bytes(views[0])
        with self._lock:
            counter = self._counter
            self._counter += 1
            seal = bytes([VERSION]) + self.session + counter.to_bytes(8, "big")
            common = _common_ad(seal, self.origin, self.dest, len(views), headers)
            # The body is small (bulk bytes are buffers): one copy to prepend the seal is cheap.
            first = seal + self._aead.encrypt(_nonce(counter, 1), views[1], _U32.pack(1) + common)
            out: list[Any] = [frames[0], first]
            for i in range(2, len(views)):
                out.append(self._aead.encrypt(_nonce(counter, i), views[i], _U32.pack(i) + common))
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
        wall_clock, random_bytes: for session ids (tests pass their own).
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
        self._clock = wall_clock
        self._random = random_bytes
        self._lock = threading.Lock()
        self._shared: OrderedDict[bytes, bytes] = OrderedDict()
        self._out: OrderedDict[str, Outbound] = OrderedDict()
        self._in: OrderedDict[str, _Peer] = OrderedDict()
        self.stats: dict[str, int] = dict.fromkeys(
            ("opened", "malformed", "unknown_peer", "auth", "replay"), 0
        )

    # -- sending -------------------------------------------------------------------

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
        """The session that seals this cell's messages to `dest` (made on first use).

        Raises:
            SecureUnavailableError: no public key for `dest`.
        """
        key = self.require_peer(dest)
        with self._lock:
            out = self._out.get(dest)
            if out is not None and out.peer_key == key:
                self._out.move_to_end(dest)
                return out
        session = (int(self._clock()) & 0xFFFFFFFF).to_bytes(4, "big") + self._random(8)
        try:
            aead = self._session_key(key, self.fqcn, dest, self._public, z85.decode(key), session)
        except ValueError as exc:
            raise KeyFileError(f"the public key for {dest!r} is not usable: {exc}") from None
        out = Outbound(aead, session, self.fqcn, dest, key)
        with self._lock:
            raced = self._out.get(dest)
            if raced is not None and raced.peer_key == key:
                return raced
            self._out[dest] = out
            while len(self._out) > self._max_peers:
                self._out.popitem(last=False)  # a new session replaces it if it comes back
        return out

    # -- receiving -----------------------------------------------------------------

    def open(self, origin: str, frames: Sequence[Any]) -> list[Any]:
        """Check and decrypt a sealed ``[headers, body, *buffers]`` from `origin`.

        Returns:
            ``[headers, body, *buffers]`` in plaintext, for :func:`objdl.wire.decode`.

        Raises:
            Rejected: the message must be dropped; ``kind`` and ``reason`` say why.
        """
        try:
            return self._open(origin, frames)
        except Rejected as exc:
            with self._lock:
                self.stats[exc.kind] += 1
            raise

    def _open(self, origin: str, frames: Sequence[Any]) -> list[Any]:
        views = [_view(f) for f in frames]
        if len(views) < 2 or views[1].nbytes < SEAL_LEN + _TAG_LEN or views[1][0] != VERSION:
            raise Rejected("malformed", "marked secure but carries no valid seal")
        seal = bytes(views[1][:SEAL_LEN])
        session, counter = seal[1 : 1 + SESSION_LEN], int.from_bytes(seal[1 + SESSION_LEN :], "big")
        key, why = self._peers.lookup(origin)
        if key is None:
            raise Rejected("unknown_peer", f"cannot check a secure message from {origin!r}: {why}")
        with self._lock:
            peer = self._in.get(origin)
            known = peer.sessions.get(session) if peer is not None and peer.key == key else None
            if known is not None:
                self._check_window(known, counter)
                aead = known.aead
            elif peer is not None and peer.key == key and peer.stale(session):
                raise Rejected("replay", _STALE)
        if known is None:
            peer_public = z85.decode(key)
            try:
                aead = self._session_key(key, origin, self.fqcn, peer_public, self._public, session)
            except ValueError as exc:
                why = f"the key for {origin!r} is unusable: {exc}"
                raise Rejected("unknown_peer", why) from None
        plain = self._decrypt(aead, seal, counter, origin, views)
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
        return [frames[0], *plain]

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
    ) -> list[bytes]:
        common = _common_ad(seal, origin, self.fqcn, len(views), bytes(views[0]))
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
        session: bytes,
    ) -> ChaCha20Poly1305:
        info = (
            _MAGIC
            + _lp(sender_pub)
            + _lp(receiver_pub)
            + _lp(sender.encode())
            + _lp(receiver.encode())
            + session
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
