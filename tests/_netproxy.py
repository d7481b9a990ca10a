"""Loopback network helpers for the direct-link tests: a TCP proxy the test can cut or
turn into a black hole, and what /proc says about a port's TCP sockets."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from pathlib import Path

__all__ = ["ESTABLISHED", "LISTEN", "Proxy", "free_port", "port_of", "tcp_states"]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def tcp_states(port: int) -> list[str]:
    """States of this host's TCP sockets on 127.0.0.1:`port` (either end), from /proc."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        for end in (local, remote):
            if end == f"0100007F:{port:04X}":
                states.append(state)
    return states


ESTABLISHED, LISTEN = "01", "0A"  # /proc/net/tcp state codes


class Proxy:
    """A TCP forwarder on 127.0.0.1 in front of an owner's data port, that the test can
    cut (both sockets closed, no more listening) or turn into a black hole (nothing
    forwarded, sockets kept open). One thread owns every socket; commands wait for it."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.to_site = 0  # bytes forwarded from the owner to the site
        self._mode = "forward"
        self._changed = threading.Event()
        self._applied = threading.Event()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._from_owner: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._run, name="test-proxy")
        self._thread.start()

    def _command(self, mode: str) -> None:
        self._applied.clear()
        self._mode = mode
        self._changed.set()
        assert self._applied.wait(5.0), f"the proxy did not {mode} within 5s"

    def cut(self) -> None:
        """Close every connection and stop listening (returns once done)."""
        self._command("cut")

    def black_hole(self) -> None:
        """Stop forwarding, keep every socket open (returns once it stopped)."""
        self._command("hole")

    def close(self) -> None:
        if self._thread.is_alive():
            self._command("cut")
        self._thread.join(5.0)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while self._mode == "forward":
                for key, _ in sel.select(0.02):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept(sel)
                    elif not self._pump(sock):
                        self._drop(sel, sock)
            sel.close()
            if self._mode == "hole":
                self._applied.set()
                self._changed.clear()
                while self._mode == "hole":
                    self._changed.wait(0.1)
        finally:
            for sock in list(self._peers):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._peers.clear()
            self._listener.close()
            self._applied.set()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            site, _ = self._listener.accept()
        except BlockingIOError:
            return
        owner = socket.create_connection(("127.0.0.1", self._upstream), timeout=5.0)
        for s in (site, owner):
            s.settimeout(5.0)  # sendall waits for a slow reader, never forever
            sel.register(s, selectors.EVENT_READ)
        self._peers[site], self._peers[owner] = owner, site
        self._from_owner.add(owner)

    def _pump(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(1 << 20)
            if not data:
                return False
            self._peers[sock].sendall(data)
        except OSError:
            return False
        if sock in self._from_owner:
            self.to_site += len(data)
        return True

    def _drop(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        for s in (sock, self._peers.get(sock)):
            if s is None or s not in self._peers:
                continue
            sel.unregister(s)
            self._peers.pop(s)
            self._from_owner.discard(s)
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
