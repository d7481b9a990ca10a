"""What every shell of a cell (threads, asyncio) shares about direct links: the checks of
the data-socket arguments, and the link methods of the public face.

The protocol is in ``_links.py`` (sans-I/O, on the core) and the sockets in
``_linkio.py`` (driven by whichever loop owns the cell's sockets); the methods here only
read the core's tables or hand them work, which is safe from any thread, and wake the
shell through the core.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from objdl.cell._dealer import Settings
from objdl.cell._linkio import DataConfig
from objdl.cell._links import check_offer, offer_url_ok
from objdl.security import KeyPair, KeyPolicy, PeerKeySource

if TYPE_CHECKING:
    from objdl.cell._core import CellCore
    from objdl.security._e2e import EndToEnd

__all__ = ["DirectLinks", "data_config"]

log = logging.getLogger("objdl.cell")

_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+")
_HOST = re.compile(r"\[?[0-9A-Fa-f:.]+\]?|[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def data_config(
    conf: Settings,
    bind: str | None,
    advertise: str | None,
    allowed: PeerKeySource | None,
    peer_keys: PeerKeySource | None,
) -> DataConfig | None:
    """Check a cell's data-socket arguments (see :class:`objdl.cell.Cell`) against its
    other settings (`conf`: CURVE to the broker or not, keys or not); raise ValueError."""
    curve, has_keys = conf.broker_key is not None, conf.keys is not None
    if bind is None:
        if advertise is not None or allowed is not None:
            raise ValueError("data_advertise and data_allowed_keys need data_bind")
        return None
    if not isinstance(bind, str) or not _URL.fullmatch(bind.replace(":*", ":0")):
        raise ValueError(f"data_bind must look like tcp://HOST:PORT (PORT may be *), got {bind!r}")
    if advertise is not None and (
        not isinstance(advertise, str)
        or not advertise.strip()
        or ("://" in advertise and not offer_url_ok(advertise))
        or ("://" not in advertise and not _HOST.fullmatch(advertise))
    ):
        raise ValueError(
            "data_advertise must be a host or a tcp://HOST:PORT URL (what sites connect "
            f"to), got {advertise!r}"
        )
    if allowed is None and not curve:
        return DataConfig(bind, advertise, None)  # plain TCP, as the broker connection
    source = allowed if allowed is not None else peer_keys
    if source is None:
        raise ValueError(
            "this cell talks CURVE to its broker, so its data socket is a CURVE server too: "
            "give data_allowed_keys= (the allow-list of site keys and names, as the "
            "broker's) or peer_keys="
        )
    if not has_keys:
        raise ValueError("a CURVE data socket (data_allowed_keys) needs curve_keys")
    return DataConfig(bind, advertise, KeyPolicy.of(source))


class DirectLinks:
    """The direct-link members of a cell's public face (mixed into each shell).

    The shell sets :attr:`_fqcn`, :attr:`_core`, :attr:`_keys`, :attr:`_broker_key` and
    :attr:`_e2e`, and says whether it runs (:meth:`_running`).
    """

    _fqcn: str
    _core: CellCore
    _keys: KeyPair | None
    _broker_key: bytes | None
    _e2e: EndToEnd | None

    def _running(self) -> bool:
        raise NotImplementedError

    @property
    def data_url(self) -> str | None:
        """The address offered to sites for direct links (after ``start``), or None."""
        server = self._core.link_server
        return None if server is None else server.url

    def link_offer(self, peer: str) -> dict[str, Any] | None:
        """An offer of this cell's data socket for `peer`, or None (no data socket).

        Send it only in a message that goes to `peer` through the broker (a reply to
        its request): the broker's authentication of `peer` is what the offer's token
        carries over to the direct link. Any thread may ask.
        """
        server = self._core.link_server
        if server is None or peer == self._fqcn:
            return None
        return server.offer(peer, time.monotonic())

    def open_link(
        self, peer: str, offer: Any, on_ready: Callable[[bool], None] | None = None
    ) -> str:
        """Open a direct link to `peer` as its `offer` says; returns at once.

        Until the link is up, and after it goes down, messages to `peer` go through
        the broker. Returns ``""`` if the link is being made (or is up), else why it
        is not used (offers are peer data: any value is checked). If it returns
        ``""``, `on_ready(up)` is called once the link is up (True) or will not be
        (False): on the thread that owns the cell's sockets (the I/O thread, or the
        event loop's; so it must be cheap and never block), or at once if the link
        is up already.
        """
        table = self._core.link_table
        if table is None:
            return "direct links are off (direct_links=False)"
        if not self._running():
            return "the cell is not running"
        checked = check_offer(offer)
        if isinstance(checked, str):
            log.warning("cell %s: ignored a link offer from %s: %s", self._fqcn, peer, checked)
            return checked
        if checked.key is None and self._broker_key is not None:
            return "a plaintext link offered to a cell that uses CURVE: not used"
        if checked.key is not None:
            if self._keys is None:
                return "a CURVE link needs curve_keys on this cell"
            if self._e2e is not None:
                known, _ = self._e2e.peer_key(peer)
                if known is not None and known != checked.key:
                    log.warning(
                        "cell %s: link offer for %s carries a key that is not %s's: not used",
                        self._fqcn,
                        peer,
                        peer,
                    )
                    return f"the offer's key is not the key known for {peer}"
        why = table.open(peer, checked, time.monotonic(), on_ready)
        if not why:
            self._core.wake()  # the shell makes the link's socket
        return why

    def link_state(self, peer: str) -> str:
        """The direct link to `peer`: ``none``, ``connecting``, ``up`` or ``failed``."""
        table = self._core.link_table
        return "none" if table is None else table.state(peer)

    @property
    def link_stats(self) -> dict[str, int]:
        """Counts of links opened, failed and lost (site); connections bound, LINKs
        refused, connections dropped and CURVE keys turned away (owner)."""
        out: dict[str, int] = {}
        if self._core.link_table is not None:
            out.update(self._core.link_table.stats)
        if self._core.link_server is not None:
            out.update(self._core.link_server.stats)
        return out
