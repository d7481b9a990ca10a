"""Direct links between two cells, beside the broker: offers, tokens, state, routing.

Why: bulk traffic (a download's chunks) through the broker crosses two hops and
costs the broker's CPU; when the owner of an object is reachable from the site, a
direct connection halves that. The broker stays the control plane: it
authenticates the site and carries the offer.

How it works, with no sockets here (the cell's I/O thread owns them):

- An owner cell made with ``data_bind`` has a :class:`LinkServer`. It hands a peer
  an *offer* (:meth:`LinkServer.offer`: the address, its public key under CURVE, and
  a token) inside a reply that travels through the broker, to the name the broker
  authenticated. The token is an HMAC over (owner, site, expiry, nonce) under a
  secret only this cell knows: it proves the holder received that reply. Each token
  opens one connection (the used ones are kept until they expire), no offer goes to
  a site whose link is live, and a live name is not bound to a second connection.
- The site's cell opens a :class:`LinkClient` to the address and says
  ``LINK name token``. The server binds the connection to ``name`` only if the token
  is valid for it and, under CURVE, the connection's key (its ZAP User-Id) may use
  that name (:class:`~objdl.security.KeyPolicy`): the same allow-list and name
  bindings as the broker. Every message on a bound connection gets that name as
  its origin, whatever it claims.
- While a link is up, the site sends its requests and fires to the owner over it;
  the owner answers each request the way it came (the connection it arrived on, if
  still bound to that site, else the broker), and replies resolve in the one table
  of waiters whichever way they come. Messages too big for the link go through the
  broker. Heartbeats keep it alive; silence, a refused send or a closed connection
  takes it down, and then what was queued for it goes to the broker and the
  requests already sent over it fail with ``comm_error`` at once, marked
  ``link_lost`` (a download asks them again through the broker, spending no try).
- A link that could not be made is not tried again for :data:`RETRY_AFTER` seconds.

Wire (the data socket is a ROUTER on the owner, a DEALER per link on the site):
``[LINK, name, token]`` -> ``[LINK_OK]`` or ``[LINK_ERR, reason]``; ``[HB]`` both ways;
``[BYE]``; ``[MSG, owner-name, headers, body, *buffers]`` (requests and fires from
the site, replies from the owner).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zmq.utils import z85

from objdl import fqcn as _fqcn
from objdl import wire
from objdl._logutil import RateLimitedLog, peer_text
from objdl.security import KeyPolicy, short_key

__all__ = [
    "LINK_MAX_TO_OWNER",
    "LINK_MAX_TO_SITE",
    "RETRY_AFTER",
    "LinkClient",
    "LinkServer",
    "LinkTable",
    "Offer",
    "check_offer",
    "frames_size",
    "offer_url_ok",
]

log = logging.getLogger("objdl.cell")

LINK_MAX_TO_OWNER = 4 << 20
"""The data socket's largest message in (site -> owner: requests, small replies)."""
LINK_MAX_TO_SITE = 80 << 20
"""The largest message a site's link takes in (owner -> site: a chunk of up to 64 MiB)."""
RETRY_AFTER = 30.0
"""Seconds before a link that failed to a peer is tried again."""
TOKEN_TTL = 30.0
"""Seconds a token stays good for opening a link."""
CONNECT_TIMEOUT = 3.0
"""Seconds a new link may take to be accepted before it counts as failed."""
IDLE_CLOSE = 120.0
"""Seconds without a message after which a site closes its link."""
MAX_LINKS = 64
"""Links a site cell keeps open at once (beyond: the new one is not opened)."""
MAX_BOUND = 4096
"""Connections an owner keeps bound at once (beyond: LINK_ERR)."""

_TAG = b"objdl-link-v1\0"
_MAC_LEN = 16
_NONCE_LEN = 8
_TOKEN_LEN = 8 + _NONCE_LEN + _MAC_LEN  # expiry | nonce | mac
_USED_MAX = 65536  # tokens used lately (each opens one connection only)
_NAME_MAX = _fqcn.MAX_FQCN_LENGTH
# A host name or an address, never libzmq's "tcp://SOURCE;HOST:PORT": a peer does not
# choose which of this host's interfaces or addresses a link leaves from.
_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}|ipc://[^\s]{1,200}")
_FAILED_MAX = 1024
_SENT_MAX = 4096
_HELLO_EVERY = 0.02  # LINK again until answered (the first one may find no connection yet)


def offer_url_ok(url: str) -> bool:
    """True if `url` is an address an offer may carry (what sites accept)."""
    return len(url) <= 256 and _URL.fullmatch(url) is not None


def frames_size(frames: list[Any]) -> int:
    """Bytes in `frames` (bytes, memoryviews, zmq Frames)."""
    total = 0
    for f in frames:
        total += f.nbytes if isinstance(f, memoryview) else len(f)
    return total


@dataclass(frozen=True)
class Offer:
    """Where and how to reach a peer's data socket, as its offer said (checked)."""

    url: str
    key: bytes | None  # the server's Z85 public key (CURVE), None for plain TCP
    token: bytes

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"url": self.url, "token": self.token}
        if self.key is not None:
            d["key"] = self.key.decode("ascii")
        return d


def check_offer(offer: Any) -> Offer | str:
    """The :class:`Offer` in `offer` (from a peer: any value), or why it is not one."""
    if not isinstance(offer, dict):
        return f"an offer must be a dict, got {type(offer).__name__}"
    url, key, token = offer.get("url"), offer.get("key"), offer.get("token")
    if not isinstance(url, str) or not offer_url_ok(url):
        return "an offer's url must look like tcp://HOST:PORT or ipc://PATH"
    if not isinstance(token, bytes) or len(token) != _TOKEN_LEN:
        return f"an offer's token must be {_TOKEN_LEN} bytes"
    zkey: bytes | None = None
    if key is not None:
        if not isinstance(key, str) or len(key) != 40:
            return "an offer's key must be a 40-character Z85 public key"
        try:
            if len(z85.decode(key.encode("ascii"))) != 32:
                raise ValueError
        except Exception:  # KeyError, struct.error...: whatever z85 makes of junk
            return "an offer's key must be a 40-character Z85 public key"
        zkey = key.encode("ascii")
    return Offer(url, zkey, token)


class LinkServer:
    """An owner's data socket: tokens it hands out, and the connections bound by them.

    Args:
        name: this cell's name.
        url: the address sites connect to (advertised in offers).
        key: this cell's Z85 public key if the socket is a CURVE server, else None.
        policy: under CURVE, the keys allowed and the names each may use.
        timeout: seconds of silence after which a bound connection is forgotten.
        secret: the HMAC key of tokens (default: 32 random bytes).
    """

    def __init__(
        self,
        name: str,
        url: str,
        key: bytes | None,
        policy: KeyPolicy | None,
        timeout: float,
        secret: bytes | None = None,
    ) -> None:
        self.name = name
        self._name_b = name.encode()
        self.url = url
        self.key = key
        self.policy = policy
        self.timeout = timeout
        self._secret = secret or os.urandom(32)
        self.out: deque[list[Any]] = deque()  # [routing id, *frames]
        self._lock = threading.Lock()
        self._by_rid: dict[bytes, tuple[str, float]] = {}  # rid -> (name, last heard)
        self._by_name: dict[str, bytes] = {}
        self._key_of: dict[bytes, str | None] = {}  # rid -> the CURVE key that bound it
        # Names of connections unbound lately: every message already queued for one
        # still knows whom to go to (through the broker) when its send fails.
        self._gone: dict[bytes, str] = {}
        # Tokens that opened a link, until they expire: a copied token (from a
        # plaintext network) opens no second connection.
        self._used: dict[bytes, tuple[bytes, float]] = {}  # token -> (rid, expiry in s)
        self._next_prune = 0.0
        self.stats = {"links_bound": 0, "links_refused": 0, "link_dropped": 0, "zap_denied": 0}
        self._rlog = RateLimitedLog(log)

    # -- offers ------------------------------------------------------------------------

    def offer(self, peer: str, now: float) -> dict[str, Any] | None:
        """An offer for `peer`, to send in a reply that goes to `peer` through the broker;
        None while `peer` has a live link here (it needs none, and a token it does not
        use is one an eavesdropper could)."""
        if self._live(peer, now):
            return None
        head = int((now + TOKEN_TTL) * 1000).to_bytes(8, "big") + os.urandom(_NONCE_LEN)
        return Offer(self.url, self.key, head + self._mac(peer, head)).as_dict()

    def _live(self, peer: str, now: float, but: bytes | None = None) -> bool:
        """True if `peer` is bound to a connection (other than `but`) heard lately."""
        rid = self._by_name.get(peer)
        if rid is None or rid == but:
            return False
        entry = self._by_rid.get(rid)
        return entry is not None and now - entry[1] <= self.timeout

    def _mac(self, peer: str, head: bytes) -> bytes:
        msg = _TAG + self._name_b + b"\0" + peer.encode() + b"\0" + head
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_MAC_LEN]

    def _token_error(self, peer: str, token: bytes, rid: bytes, now: float) -> str:
        if len(token) != _TOKEN_LEN:
            return "bad token"
        head = token[: 8 + _NONCE_LEN]
        if not hmac.compare_digest(token[len(head) :], self._mac(peer, head)):
            return "bad token"
        if int.from_bytes(head[:8], "big") < now * 1000:
            return "token expired"
        used = self._used.get(token)
        if used is not None and used[0] != rid:
            return "token used already (each opens one connection)"
        if used is None and len(self._used) >= _USED_MAX:
            return "too many links lately"
        return ""

    # -- the data socket's traffic (the I/O thread) -------------------------------------

    def on_link(self, rid: bytes, frames: list[Any], identity: str | None, now: float) -> None:
        """``[LINK, name, token]`` from connection `rid` (`identity`: its CURVE key)."""
        why = ""
        name = ""
        if len(frames) != 3:
            why = "LINK takes a name and a token"
        elif len(frames[1]) > _NAME_MAX or len(frames[2]) != _TOKEN_LEN:
            why = "bad name" if len(frames[1]) > _NAME_MAX else "bad token"
        else:
            try:
                name = _fqcn.validate(frames[1].bytes.decode())
            except (UnicodeDecodeError, ValueError):
                why = "bad name"
            token = frames[2].bytes
            if not why:
                why = self._token_error(name, token, rid, now)
            if not why and self.policy is not None:
                why = self.policy.check(identity, name)
            if not why and self._live(name, now, but=rid):
                why = "a link for this name is up"  # (a site makes one at a time)
            if not why and len(self._by_rid) >= MAX_BOUND and rid not in self._by_rid:
                why = "too many links"
        if why:
            self.stats["links_refused"] += 1
            self._rlog.log(  # peers choose how often: rate-limited
                logging.WARNING,
                "refused",
                "cell %s refused a direct link from %s: %s",
                self.name,
                name or "?",
                why if identity is None else f"{why} (key {short_key(identity)})",
            )
            self.out.append([rid, wire.KIND_LINK_ERR, why.encode()])
            return
        again = token in self._used  # the site says LINK until answered: one bind
        self._used[token] = (rid, int.from_bytes(token[:8], "big") / 1000)
        with self._lock:
            old = self._by_name.get(name)
            if old is not None and old != rid:
                self._by_rid.pop(old, None)
                self._key_of.pop(old, None)
            self._by_rid[rid] = (name, now)
            self._by_name[name] = rid
            self._key_of[rid] = identity
        if not again:
            self.stats["links_bound"] += 1
        self.out.append([rid, wire.KIND_LINK_OK])

    def bound(self, rid: bytes, now: float, identity: str | None = None) -> str | None:
        """The name connection `rid` is bound to (it was heard now), or None.

        Under CURVE the message's key (`identity`) must be the one that bound it: a
        peer that reconnects with the routing id of a gone connection gets nothing.
        """
        entry = self._by_rid.get(rid)
        if entry is None:
            return None
        if self.policy is not None and self._key_of.get(rid) != identity:
            return None
        if now - entry[1] > 0.1:
            self._by_rid[rid] = (entry[0], now)
        return entry[0]

    def unbind(self, rid: bytes) -> None:
        with self._lock:
            entry = self._by_rid.pop(rid, None)
            self._key_of.pop(rid, None)
            if entry is None:
                return
            if self._by_name.get(entry[0]) == rid:
                del self._by_name[entry[0]]
            if len(self._gone) >= MAX_BOUND:
                self._gone.clear()
            self._gone[rid] = entry[0]

    def tick(self, now: float) -> None:
        """Forget connections silent for longer than the timeout."""
        silent = [rid for rid, (_, heard) in self._by_rid.items() if now - heard > self.timeout]
        for rid in silent:
            self.unbind(rid)
            self.stats["link_dropped"] += 1
        if self._used and now >= self._next_prune:
            self._next_prune = now + 1.0
            for token in [t for t, (_, expiry) in self._used.items() if expiry < now]:
                del self._used[token]

    def route_to(self, rid: bytes, target: str, frames: list[Any]) -> bool:
        """Queue the reply `frames` (``[MSG, target, ...]``) on connection `rid` if it is
        still bound to `target` (any thread); False: send it through the broker."""
        entry = self._by_rid.get(rid)
        if entry is None or entry[0] != target or frames_size(frames) > LINK_MAX_TO_SITE:
            return False
        frames = list(frames)
        frames[1] = self._name_b  # the site sees its peer's name, as from the broker
        self.out.append([rid, *frames])
        return True

    def unreachable(self, rid: bytes, frames: list[Any]) -> list[Any] | None:
        """A send to `rid` was refused (gone): unbind it; the frames for the broker.

        Every message queued for `rid` before it went comes here in turn, not only
        the first: each goes on through the broker.
        """
        if rid in self._by_rid:
            self.unbind(rid)
            self.stats["link_dropped"] += 1
        name = self._gone.get(rid)
        if name is None or len(frames) < 3 or frames[1] != wire.KIND_MSG:
            return None
        return [wire.KIND_MSG, name.encode(), *frames[3:]]


@dataclass
class LinkClient:
    """A site's link to one peer: its state, what waits to go out, what went out."""

    peer: str
    offer: Offer
    started: float
    state: str = "connecting"  # connecting -> up -> closed | failed
    heard: float = 0.0
    used: float = 0.0
    next_hello: float = 0.0
    next_hb: float = 0.0
    out: deque[tuple[list[Any], int | None]] = field(default_factory=deque)  # frames, req_id
    sent_requests: set[int] = field(default_factory=set)  # sent on it, not answered yet
    why: str = ""
    on_ready: list[Callable[[bool], None]] = field(default_factory=list)


class LinkTable:
    """A site cell's links, by peer name, and the peers whose link failed lately.

    Thread safety: :meth:`route` runs on any thread; state changes on the I/O thread,
    under :attr:`lock`, so a message is either on a live link's queue or the broker's.
    """

    def __init__(
        self,
        name: str,
        heartbeat: float,
        timeout: float,
        fail: Callable[[set[int], str], None],
        waiting: Callable[[int], bool],
        broker_out: deque[list[Any]],
    ) -> None:
        self.name = name
        self._name_b = name.encode()
        self.heartbeat = heartbeat
        self.timeout = timeout
        self._fail = fail
        self._waiting = waiting
        self._broker_out = broker_out
        self.lock = threading.Lock()
        self.links: dict[str, LinkClient] = {}
        self.up: dict[str, LinkClient] = {}
        self.failed: dict[str, float] = {}  # peer -> when it may be tried again
        self.opens: deque[LinkClient] = deque()  # for the shell: make a socket
        self.closes: deque[LinkClient] = deque()  # for the shell: close its socket
        self.stats = {"links_opened": 0, "links_failed": 0, "links_lost": 0}

    def state(self, peer: str) -> str:
        link = self.links.get(peer)
        if link is not None:
            return link.state
        return "failed" if peer in self.failed else "none"

    def open(
        self,
        peer: str,
        offer: Offer,
        now: float,
        on_ready: Callable[[bool], None] | None = None,
    ) -> str:
        """Start a link to `peer` (returns at once); ``""`` or why not.

        `on_ready(up)` is called once the link is up (True) or will not be (False),
        on the I/O thread, or at once here if it is up already.
        """
        with self.lock:
            link = self.links.get(peer)
            if link is not None:
                if link.state == "connecting" and on_ready is not None:
                    link.on_ready.append(on_ready)
                    on_ready = None
                up = link.state == "up"
            else:
                up = False
        if link is not None:
            if on_ready is not None:
                _call_ready([on_ready], up)
            return ""
        with self.lock:
            until = self.failed.get(peer)
            if until is not None and now < until:
                return "failed lately"
            self.failed.pop(peer, None)
            if len(self.links) >= MAX_LINKS:
                return "too many links"
            link = LinkClient(peer, offer, now, heard=now, used=now, next_hello=now)
            if on_ready is not None:
                link.on_ready.append(on_ready)
            self.links[peer] = link
            self.opens.append(link)
        self.stats["links_opened"] += 1
        return ""

    def route(self, target: str, frames: list[Any], req_id: int | None = None) -> bool:
        """Queue `frames` on `target`'s link if it is up (any thread); True if queued."""
        link = self.up.get(target)
        if link is None or frames_size(frames) > LINK_MAX_TO_OWNER:
            return False
        with self.lock:
            if link.state != "up":
                return False
            link.out.append((frames, req_id))
        return True

    # -- the I/O thread -------------------------------------------------------------------

    def on_frames(self, link: LinkClient, frames: list[Any], now: float) -> list[Any] | None:
        """One message from `link`'s socket; a MSG's frames (for the core), else None."""
        kind = frames[0].bytes
        link.heard = now
        if kind == wire.KIND_MSG:
            if link.state != "up" or len(frames) < 3 or frames[1].bytes != link.peer.encode():
                return None
            return frames
        if kind == wire.KIND_LINK_OK and link.state == "connecting":
            with self.lock:
                link.state = "up"
                self.up[link.peer] = link
                ready, link.on_ready = link.on_ready, []
            link.next_hb = now + self.heartbeat
            _call_ready(ready, True)
            log.info("cell %s: direct link to %s up (%s)", self.name, link.peer, link.offer.url)
        elif kind == wire.KIND_LINK_ERR:
            why = frames[1].bytes[:200].decode("utf-8", "replace") if len(frames) > 1 else ""
            why = peer_text(why, 200)  # the peer's text, into our log: no escapes, no lines
            self.down(link, f"refused: {why}", now, failed=True)
        return None

    def tick(self, now: float) -> list[tuple[LinkClient, list[Any]]]:
        """Hellos, heartbeats and timeouts; the control frames to send on each link."""
        send: list[tuple[LinkClient, list[Any]]] = []
        for link in list(self.links.values()):
            if link.state == "connecting":
                if now - link.started > CONNECT_TIMEOUT:
                    self.down(link, f"no answer within {CONNECT_TIMEOUT:g}s", now, failed=True)
                elif now >= link.next_hello:
                    link.next_hello = now + _HELLO_EVERY
                    send.append((link, [wire.KIND_LINK, self._name_b, link.offer.token]))
            elif link.state == "up":
                if now - link.heard > self.timeout:
                    self.down(link, f"silent for {self.timeout:g}s", now, failed=True)
                elif link.out or link.sent_requests:
                    link.used = now
                    if len(link.sent_requests) > _SENT_MAX:  # answered another way, or gone
                        with self.lock:
                            link.sent_requests = {r for r in link.sent_requests if self._waiting(r)}
                elif now - link.used > IDLE_CLOSE:
                    send.append((link, [wire.KIND_BYE]))
                    self.down(link, "idle", now)
                if link.state == "up" and now >= link.next_hb:
                    link.next_hb = now + self.heartbeat
                    send.append((link, [wire.KIND_HB]))
        return send

    def down(self, link: LinkClient, why: str, now: float, failed: bool = False) -> None:
        """Take `link` down: its queue to the broker, its requests failed, its socket closed."""
        with self.lock:
            if link.state in ("closed", "failed"):
                return
            was_up = link.state == "up"
            link.state = "failed" if failed else "closed"
            link.why = why
            self.links.pop(link.peer, None)
            self.up.pop(link.peer, None)
            # Not sent yet: to the broker instead (and not failed: they will be answered).
            self._broker_out.extend(frames for frames, _ in link.out)
            link.out.clear()
            sent = link.sent_requests
            link.sent_requests = set()
            ready, link.on_ready = link.on_ready, []
            if failed:
                if len(self.failed) >= _FAILED_MAX:
                    self.failed.clear()
                self.failed[link.peer] = now + RETRY_AFTER
        self.closes.append(link)
        if failed:
            self.stats["links_lost" if was_up else "links_failed"] += 1
            log.warning(
                "cell %s: direct link to %s %s: %s; using the broker",
                self.name,
                link.peer,
                "lost" if was_up else "not made",
                why,
            )
        _call_ready(ready, False)
        if sent:
            self._fail(sent, f"direct link to {link.peer} {link.state}: {why}")

    def in_flight(self) -> frozenset[int]:
        """The requests sent or queued on links that are up (they need no broker)."""
        with self.lock:
            sent = {r for link in self.up.values() for r in link.sent_requests}
            queued = {r for link in self.up.values() for _, r in link.out if r is not None}
        return frozenset(sent | queued)

    def sent(self, link: LinkClient, req_id: int | None) -> None:
        """A request left on `link` (the I/O thread): if the link goes down, it fails."""
        if req_id is not None:
            with self.lock:
                if link.state == "up":
                    link.sent_requests.add(req_id)

    def replied(self, peer: str, req_id: int) -> None:
        """Request `req_id` to `peer` got its reply (whichever way it came)."""
        link = self.up.get(peer)
        if link is not None:
            link.sent_requests.discard(req_id)

    def close_all(self, now: float) -> list[tuple[LinkClient, list[Any]]]:
        """The cell stops: BYE on every link, each taken down."""
        send = [(link, [wire.KIND_BYE]) for link in self.links.values() if link.state == "up"]
        for link in list(self.links.values()):
            self.down(link, "cell stopping", now)
        return send


def _call_ready(callbacks: list[Callable[[bool], None]], up: bool) -> None:
    for cb in callbacks:
        try:
            cb(up)
        except Exception:  # a caller's hook never breaks the I/O thread
            log.exception("a direct link's on_ready hook raised")
