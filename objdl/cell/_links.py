"""Direct links between two cells, beside the broker: offers, tokens, state, routing.

Why: bulk traffic (a download's chunks) through the broker crosses two hops and
costs the broker's CPU; when the owner of an object is reachable from the site, a
direct connection halves that. The broker stays the control plane: it
authenticates the site and carries the offer.

How it works, with no sockets here (the cell's I/O thread owns them):

- An owner cell made with ``data_bind`` has a :class:`LinkServer`. It hands a peer
  an *offer* (:meth:`LinkServer.offer`: the address, its public key under CURVE, and
  a token) inside a reply that travels through the broker, to the name the broker
  authenticated. The token is an HMAC over (owner, site, expiry) under a secret only
  this cell knows, so it holds no table and proves the holder received that reply.
- The site's cell opens a :class:`LinkClient` to the address and says
  ``LINK name token``. The server binds the connection to ``name`` only if the token
  is valid for it and, under CURVE, the connection's key (its ZAP User-Id) may use
  that name (:class:`~objdl.security.KeyPolicy`): the same allow-list and name
  bindings as the broker. Every message on a bound connection gets that name as
  its origin, whatever it claims.
- While a link is up, every message between the two cells goes over it (both
  ways), so replies to requests sent either way resolve in the one table of
  waiters; messages too big for the link go through the broker. Heartbeats keep
  it alive; silence, a refused send or a closed connection takes it down, and then
  what was queued for it goes to the broker and the requests sent over it fail
  with ``comm_error`` at once (callers retry, through the broker).
- A link that could not be made is not tried again for :data:`RETRY_AFTER` seconds.

Wire (the data socket is a ROUTER on the owner, a DEALER per link on the site):
``[LINK, name, token]`` -> ``[LINK_OK]`` or ``[LINK_ERR, reason]``; ``[HB]`` both ways;
``[BYE]``; ``[MSG, owner-name, headers, body, *buffers]`` both ways.
"""

from __future__ import annotations

import contextlib
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
TOKEN_TTL = 600.0
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
_TOKEN_LEN = 8 + _MAC_LEN
_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|ipc://[^\s]{1,200}")
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
        except (ValueError, UnicodeEncodeError, KeyError, IndexError):
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
        # Names of connections unbound lately: messages already queued for one still
        # know whom to go to (through the broker) when its send fails.
        self._gone: dict[bytes, str] = {}
        # Connections whose site has sent a MSG or HB on them (its end is up): a
        # request from it that comes through the broker after that means its end
        # went down, and is answered through the broker (see came_by_broker).
        self._used: set[bytes] = set()
        self._by_broker: set[tuple[str, Any]] = set()
        self.stats = {"links_bound": 0, "links_refused": 0, "link_dropped": 0}

    # -- offers ------------------------------------------------------------------------

    def offer(self, peer: str, now: float) -> dict[str, Any]:
        """An offer for `peer`, to send in a reply that goes to `peer` through the broker."""
        expiry = int((now + TOKEN_TTL) * 1000).to_bytes(8, "big")
        return Offer(self.url, self.key, expiry + self._mac(peer, expiry)).as_dict()

    def _mac(self, peer: str, expiry: bytes) -> bytes:
        msg = _TAG + self._name_b + b"\0" + peer.encode() + b"\0" + expiry
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_MAC_LEN]

    def _token_error(self, peer: str, token: bytes, now: float) -> str:
        if len(token) != _TOKEN_LEN:
            return "bad token"
        expiry = token[:8]
        if not hmac.compare_digest(token[8:], self._mac(peer, expiry)):
            return "bad token"
        if int.from_bytes(expiry, "big") < now * 1000:
            return "token expired"
        return ""

    # -- the data socket's traffic (the I/O thread) -------------------------------------

    def on_link(self, rid: bytes, frames: list[Any], identity: str | None, now: float) -> None:
        """``[LINK, name, token]`` from connection `rid` (`identity`: its CURVE key)."""
        why = ""
        name = ""
        if len(frames) != 3:
            why = "LINK takes a name and a token"
        else:
            try:
                name = _fqcn.validate(frames[1].bytes.decode())
            except (UnicodeDecodeError, ValueError):
                why = "bad name"
            if not why:
                why = self._token_error(name, frames[2].bytes, now)
            if not why and self.policy is not None:
                why = self.policy.check(identity, name)
            if not why and len(self._by_rid) >= MAX_BOUND and rid not in self._by_rid:
                why = "too many links"
        if why:
            self.stats["links_refused"] += 1
            log.warning(
                "cell %s refused a direct link from %s: %s",
                self.name,
                name or "?",
                why if identity is None else f"{why} (key {short_key(identity)})",
            )
            self.out.append([rid, wire.KIND_LINK_ERR, why.encode()])
            return
        with self._lock:
            again = self._by_rid.get(rid, ("",))[0] == name  # a hello repeated before LINK_OK
            old = self._by_name.get(name)
            if old is not None and old != rid:
                self._by_rid.pop(old, None)
                self._used.discard(old)
                self._gone[old] = name
            self._by_rid[rid] = (name, now)
            self._by_name[name] = rid
        if not again:
            self.stats["links_bound"] += 1
        self.out.append([rid, wire.KIND_LINK_OK])

    def bound(self, rid: bytes, now: float) -> str | None:
        """The name connection `rid` is bound to (it was heard now, with a MSG or an
        HB: its end is up), or None."""
        entry = self._by_rid.get(rid)
        if entry is None:
            return None
        if rid not in self._used:
            self._used.add(rid)
        if now - entry[1] > 0.1:
            self._by_rid[rid] = (entry[0], now)
        return entry[0]

    def is_bound(self, rid: bytes) -> bool:
        return rid in self._by_rid

    def unbind(self, rid: bytes) -> None:
        with self._lock:
            entry = self._by_rid.pop(rid, None)
            self._used.discard(rid)
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

    def came_by_broker(self, peer: str, req_id: Any) -> None:
        """A request from `peer` came through the broker although `peer` is bound here.

        Before its end of the link was up (no MSG or HB on it yet), that is what a
        site does while its link is connecting: the reply may take the link (the
        LINK_OK ahead of it makes that end up first). After, its end went down (a
        black hole, say, that this end has not noticed yet): the reply goes back
        the way the request came, not into a link nobody reads.
        """
        rid = self._by_name.get(peer)
        if rid is None or rid not in self._used:
            return
        with self._lock:
            if len(self._by_broker) >= _SENT_MAX:
                self._by_broker.clear()
            with contextlib.suppress(TypeError):  # an unhashable req_id from a hostile peer
                self._by_broker.add((peer, req_id))

    def answer_by_broker(self, peer: str, req_id: Any) -> bool:
        """True (once) if the request `req_id` from `peer` came through the broker."""
        if not self._by_broker:
            return False
        with self._lock:
            try:
                self._by_broker.remove((peer, req_id))
            except (KeyError, TypeError):
                return False
        return True

    def route(self, target: str, frames: list[Any]) -> bool:
        """Queue `frames` (``[MSG, target, ...]``) on `target`'s link if it has one."""
        rid = self._by_name.get(target)
        if rid is None or frames_size(frames) > LINK_MAX_TO_SITE:
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
    out: deque[list[Any]] = field(default_factory=deque)
    sent_requests: set[int] = field(default_factory=set)
    why: str = ""


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

    def open(self, peer: str, offer: Offer, now: float) -> str:
        """Start a link to `peer` (returns at once); ``""`` or why not."""
        with self.lock:
            if peer in self.links:
                return ""
            until = self.failed.get(peer)
            if until is not None and now < until:
                return "failed lately"
            self.failed.pop(peer, None)
            if len(self.links) >= MAX_LINKS:
                return "too many links"
            link = LinkClient(peer, offer, now, heard=now, used=now, next_hello=now)
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
            link.out.append(frames)
            if req_id is not None:
                link.sent_requests.add(req_id)
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
            link.next_hb = now + self.heartbeat
            log.info("cell %s: direct link to %s up (%s)", self.name, link.peer, link.offer.url)
        elif kind == wire.KIND_LINK_ERR:
            why = frames[1].bytes[:200].decode("utf-8", "replace") if len(frames) > 1 else ""
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
            queued = list(link.out)
            link.out.clear()
            self._broker_out.extend(queued)
            sent = link.sent_requests
            link.sent_requests = set()
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
        if sent:
            self._fail(sent, f"direct link to {link.peer} {link.state}: {why}")

    def requests_on_links(self) -> set[int]:
        """The requests sent (or queued) over the links that are up, still unanswered."""
        with self.lock:
            return set().union(*(link.sent_requests for link in self.up.values()))

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
