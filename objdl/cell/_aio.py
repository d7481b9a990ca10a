"""The asyncio shell of a cell: the event loop owns the socket, with no thread on the hot path.

How it works: the same sans-I/O :class:`~objdl.cell._core.CellCore` as the threaded
:class:`~objdl.cell.Cell`, driven by the loop it is started on. The loop watches the
DEALER's file descriptor (``add_reader``); ZeroMQ's descriptor only says "something
changed", so after every read and every send the shell looks at ``EVENTS`` again and
schedules another read if a message is waiting. A request is encoded, queued and sent
at once from the coroutine that makes it; its reply resolves a future on the loop.
Handlers: ``async def`` ones run as tasks on the loop, plain ones on a small thread
pool (or inline on the loop with ``inline=True``). A timer drives the session
(registration, heartbeats, reconnects). Threads other than the loop's may queue replies
(the pool does): they wake the loop with ``call_soon_threadsafe``.

Direct links (``data_bind``, ``open_link``) use the threaded cell's
:class:`~objdl.cell._linkio.LinkSockets`, driven by the loop too: every link socket's
descriptor is watched with ``add_reader`` while the socket lives; a readable one is
drained as ``EVENTS`` says, and every flush sends what waits on the links, opens and
closes their sockets as the core's table asks, and looks at ``EVENTS`` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from objdl._frames import POLLIN, POLLOUT, ready_messages, send_frames, zmq_events
from objdl._session import Action
from objdl.cell._aioview import ThreadView
from objdl.cell._core import CellCore
from objdl.cell._dealer import Handshake, close_dealer, new_dealer, settings, start_error
from objdl.cell._handlers import HandlerPool, RequestCallback
from objdl.cell._linkapi import DirectLinks, data_config
from objdl.cell._linkio import LinkSockets
from objdl.cell._links import LinkTable
from objdl.cell._pending import PendingRequest, Sealed
from objdl.errors import CellError
from objdl.message import Message, MessageHeaderKey, ReturnCode
from objdl.security import KeySource, PeerKeySource, PublicKeySource

if TYPE_CHECKING:
    from objdl.cell._handlers import _Entry

__all__ = ["AsyncCell"]

log = logging.getLogger("objdl.cell")

_H = MessageHeaderKey
_DRAIN = 256  # messages read per turn, so other callbacks get the loop
_TICK_MAX = 0.1  # s between session ticks at most
_CLOSE_LINGER_MS = 250
_E2E_CHANNEL, _E2E_HELLO = "objdl__e2e", "hello"
_HELLO_TIMEOUT = 5.0


def _hello(request: Message) -> None:
    return None


class AsyncCell(DirectLinks):
    """One named endpoint connected to an objdl broker, for asyncio programs.

    Takes the threaded :class:`~objdl.cell.Cell`'s arguments, with the same meaning
    (``data_bind`` and the other direct-link options included: an asyncio owner
    offers its data socket, an asyncio site takes the links offered to it);
    use ``async with AsyncCell(...) as cell:`` or ``await cell.start()`` /
    ``await cell.stop()``. It talks to threaded cells through the same broker.
    Everything is called from the loop it was started on, except
    :meth:`register_request_cb` and the direct-link members (:attr:`data_url`,
    :meth:`link_offer`, :meth:`open_link`, :meth:`link_state`, :attr:`link_stats`),
    which may be called at any time from any thread.
    """

    def __init__(
        self,
        fqcn: str,
        broker_url: str | Sequence[str],
        *,
        max_workers: int = 8,
        max_pending: int = 1024,
        heartbeat_interval: float = 0.5,
        broker_timeout: float = 2.0,
        start_timeout: float = 5.0,
        context: zmq.Context | None = None,
        curve_keys: KeySource | None = None,
        broker_public_key: PublicKeySource | None = None,
        peer_keys: PeerKeySource | None = None,
        drain_timeout: float = 1.0,
        data_bind: str | None = None,
        data_advertise: str | None = None,
        data_allowed_keys: PeerKeySource | None = None,
        direct_links: bool = True,
    ) -> None:
        conf = settings(
            fqcn, broker_url, max_workers, max_pending, curve_keys, broker_public_key, peer_keys
        )
        data = data_config(conf, data_bind, data_advertise, data_allowed_keys, peer_keys)
        self._conf = conf
        self._keys, self._broker_key, self._e2e = conf.keys, conf.broker_key, conf.e2e
        self._fqcn = conf.fqcn
        self.broker_urls = conf.broker_urls
        self._url_index = 0
        self._start_timeout = start_timeout
        self._drain = drain_timeout
        self._ctx = context or zmq.Context.instance()
        self._core = core = CellCore(
            conf.fqcn,
            time.monotonic(),
            self._wake,
            max_pending=max_pending,
            heartbeat_interval=heartbeat_interval,
            broker_timeout=broker_timeout,
            e2e=conf.e2e,
            switch_after=conf.switch_after(broker_timeout, start_timeout),
        )
        core.broker_url = ",".join(conf.broker_urls)
        core.dispatch = self._dispatch
        self.stats = core.stats
        self._pool = HandlerPool(conf.fqcn, max_workers, core.handlers)
        self._broker_timeout = broker_timeout
        if direct_links:
            core.link_table = LinkTable(
                conf.fqcn,
                heartbeat_interval,
                broker_timeout,
                core.fail_link_requests,
                core.waiters.waiting,
                core.out,
            )
        self._links = LinkSockets(conf.fqcn, self._ctx, core, conf.keys, data)
        self._links_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ident = -1
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._fds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stalled: list[Any] | None = None
        self._busy = False  # inside a read or a tick: flush at its end
        self._read_scheduled = False
        self._woken = False  # another thread asked the loop to flush
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self.refused = ""
        self.handshake = Handshake()
        self._state = "new"  # new -> started -> stopped
        self._stop_cbs: list[Callable[[], None]] = []
        self.threaded = ThreadView(self)
        """This cell as a blocking :class:`~objdl.cell.CellLike`, for threads beside its loop."""
        if conf.e2e is not None:
            core.handlers.register(_E2E_CHANNEL, _E2E_HELLO, _hello, (), {})

    clock = staticmethod(time.monotonic)
    """The clock request deadlines are measured on (``objdl.testing`` cells have a fake one)."""

    # ---------------------------------------------------------------- lifecycle

    @property
    def fqcn(self) -> str:
        return self._fqcn

    def _running(self) -> bool:
        return self._state == "started"

    def get_fqcn(self) -> str:
        return self._fqcn

    @property
    def broker_url(self) -> str:
        """The broker this cell is on (or tries next)."""
        return self.broker_urls[self._url_index]

    @property
    def is_connected(self) -> bool:
        """True while the broker has accepted this cell's registration."""
        return self._state == "started" and self._core.registered

    @property
    def secure_stats(self) -> dict[str, int]:
        """As :attr:`objdl.cell.Cell.secure_stats`."""
        return dict(self._conf.e2e.stats) if self._conf.e2e is not None else {}

    async def start(self, timeout: float | None = None) -> None:
        """Connect and register; return once the broker has accepted this cell.

        Raises as :meth:`objdl.cell.Cell.start` does (BrokerUnavailableError,
        NameTakenError, AuthenticationError), after cleaning up.
        """
        timeout = self._start_timeout if timeout is None else timeout
        if self._state != "new":
            raise CellError(f"cell {self._fqcn!r} was already started; make a new cell")
        self._state = "started"
        self._loop = asyncio.get_running_loop()
        self._loop_ident = threading.get_ident()
        self._ready, self._connected = asyncio.Event(), asyncio.Event()
        try:  # bound here, so that a port in use fails the start with a clear error
            self._core.link_server = self._links.bind(2 * self._broker_timeout)
        except Exception:
            self._state = "stopped"
            raise
        self._links.register(_LoopPoller(self._loop, self._on_links))
        self._pool.start()
        self._open_socket()
        self._core.session.socket_replaced(time.monotonic())
        self._tick()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        if self._core.registered:
            return
        urls = ", ".join(self.broker_urls)
        error = start_error(urls, self._fqcn, timeout, self.refused, self.handshake)
        await self.stop()
        raise error

    async def stop(self, timeout: float = 5.0) -> None:
        """Unregister, close the socket and end the handler threads. Idempotent."""
        if self._state != "started":
            self._state = "stopped"
            return
        self._state = "stopped"
        deadline = time.monotonic() + timeout
        drain_end = time.monotonic() + min(self._drain, timeout / 2)
        while (self._core.handlers.pending or self._tasks) and time.monotonic() < drain_end:
            await asyncio.sleep(0.005)  # handlers running may still queue their replies
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            if self._core.registered:
                self._flush()
            self._links.flush()
            bye = self._core.close()
            if bye is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart(bye, zmq.NOBLOCK)
            self._close_socket(_CLOSE_LINGER_MS)
        try:
            self._links.close(_CLOSE_LINGER_MS)  # BYE on each link, every socket closed
        except Exception:
            log.exception("cell %s: closing the direct links failed", self._fqcn)
        self._core.close()  # CLOSED even if the socket never opened
        self._core.waiters.fail_all(ReturnCode.COMM_ERROR, f"cell {self._fqcn} stopped")
        self.threaded.connected.set()  # wake threads waiting to be connected: they look again
        self._pool.signal_stop()
        while self._pool.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for cb in self._stop_cbs:
            try:
                cb()
            except Exception:
                log.exception("cell %s: stop callback failed", self._fqcn)

    async def __aenter__(self) -> AsyncCell:
        if self._state == "new":
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the broker to (re)accept this cell."""
        if self._state != "started" or self._connected is None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._core.registered

    def add_stop_callback(self, cb: Callable[[], None]) -> None:
        """Call `cb()` when the cell stops."""
        self._stop_cbs.append(cb)

    # ---------------------------------------------------------------- handlers

    def register_request_cb(
        self,
        channel: str,
        topic: str,
        cb: RequestCallback,
        *args: Any,
        inline: bool = False,
        **kwargs: Any,
    ) -> None:
        """Serve requests on (channel, topic) with ``cb(request, *args, **kwargs)``.

        `cb` may be ``async def`` (awaited on the loop) or a plain function (run on a
        handler thread, or on the loop itself with ``inline=True``: for quick ones).
        It returns the reply :class:`Message` or None (an empty OK reply); if it
        raises, the requester gets ``process_exception``.
        """
        if not callable(cb):
            raise TypeError(f"cb must be callable, got {type(cb).__name__}")
        if not isinstance(channel, str) or not isinstance(topic, str):
            raise TypeError("channel and topic must be str")
        inline = bool(inline) and not asyncio.iscoroutinefunction(cb)
        self._core.handlers.register(channel, topic, cb, args, kwargs, inline=inline)

    def _dispatch(self, job: Message | Sealed, origin: str) -> None:
        headers = job.headers
        entry = self._core.handlers.entry(headers.get(_H.CHANNEL), headers.get(_H.TOPIC))
        if entry is not None and asyncio.iscoroutinefunction(entry.cb):
            assert self._loop is not None
            task = self._loop.create_task(self._run_async(job, origin))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._pool.put(job, origin)

    async def _run_async(self, job: Message | Sealed, origin: str) -> None:
        handlers = self._core.handlers
        try:
            begun = handlers.begin(job, origin)
            if begun is None:
                return
            request, seal, entry = begun
            reply = await self._call(entry, request, origin)
            handlers.end(request, origin, seal, reply)
        finally:
            handlers.finished()

    async def _call(self, entry: _Entry | None, request: Message, origin: str) -> Message:
        handlers = self._core.handlers
        if entry is None:
            return handlers.no_handler(request, origin)
        try:
            result = entry.cb(request, *entry.args, **entry.kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return handlers.reply_of(result, request)
        except Exception as exc:
            return handlers.raised(exc, request)

    # ---------------------------------------------------------------- sending

    async def send_request(
        self,
        channel: str,
        target: str,
        topic: str,
        request: Message,
        timeout: float,
        secure: bool = False,
        optional: bool = False,
    ) -> Message:
        """Send `request` to `target`; the reply, or one whose ``RETURN_CODE`` says why not.

        As :meth:`objdl.cell.Cell.send_request`; cancelling the awaiting task stops
        the wait at once and forgets the request (a late reply is dropped).
        """
        replies = await self.broadcast_request(
            channel, topic, [target], request, timeout, secure, optional
        )
        return replies[target]

    async def broadcast_request(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        request: Message,
        timeout: float,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, Message]:
        """Send `request` to every target at once; wait for all replies up to `timeout`."""
        tlist = self._check_send(channel, topic, targets, request, secure)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        loop = self._running_loop()
        done = loop.create_future()
        left = [len(tlist)]

        def one_done(p: PendingRequest) -> None:
            left[0] -= 1
            if left[0] == 0 and not done.done():
                if threading.get_ident() == self._loop_ident:
                    done.set_result(None)
                else:
                    loop.call_soon_threadsafe(_settle, done)

        timer = loop.call_later(timeout, _settle, done)
        pending = self._core.submit(
            channel, topic, tlist, request, time.monotonic() + timeout, secure, on_done=one_done
        )
        try:
            await done
        finally:
            timer.cancel()
            for p in pending:
                p.cancel()
        return self._core.collect(pending, timeout, False, optional, channel, topic)

    async def fire_and_forget(
        self,
        channel: str,
        topic: str,
        targets: Iterable[str] | str,
        message: Message,
        secure: bool = False,
        optional: bool = False,
    ) -> dict[str, str]:
        """As :meth:`objdl.cell.Cell.fire_and_forget`: a return code per target."""
        tlist = self._check_send(channel, topic, targets, message, secure)
        if not self._core.registered:
            why = "fire_and_forget on %s/%s: not connected"
            self._core.log_failure(optional, why, channel, topic)
            return dict.fromkeys(tlist, ReturnCode.COMM_ERROR)
        failed: dict[str, str] = {}
        if secure:
            assert self._conf.e2e is not None
            unknown = [t for t in tlist if not self._conf.e2e.knows_session(t)]
            if unknown:
                replies = await self.broadcast_request(
                    _E2E_CHANNEL, _E2E_HELLO, unknown, Message(), _HELLO_TIMEOUT, True, optional
                )
                for t, r in replies.items():
                    if r.get_header(_H.RETURN_CODE) != ReturnCode.OK:
                        failed[t] = str(r.get_header(_H.RETURN_CODE))
            tlist = [t for t in tlist if t not in failed]
        self._core.fire(channel, topic, tlist, message, secure)
        return {**dict.fromkeys(tlist, ReturnCode.OK), **failed}

    async def list_cells(self, prefix: str = "", timeout: float = 5.0) -> list[str]:
        """As :meth:`objdl.cell.Cell.list_cells`."""
        from objdl import fqcn as _fqcn

        if prefix:
            _fqcn.validate(prefix)
        if not self._core.registered:
            raise CellError(
                f"cell {self._fqcn} is not connected to the broker at {self.broker_url}"
            )
        loop = self._running_loop()
        done = loop.create_future()
        token, w = self._core.list_query(prefix, time.monotonic() + timeout)
        w.on_done = lambda _: _settle(done)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done, timeout)
            if w.reply is None:
                raise CellError(f"the broker did not list its cells within {timeout:g}s")
            names = w.reply.payload
            assert isinstance(names, list)
            return names
        finally:
            self._core.waiters.forget_list(token)

    def _check_send(
        self, channel: str, topic: str, targets: Iterable[str] | str, msg: Message, secure: bool
    ) -> list[str]:
        if secure and self._conf.e2e is None:
            self._core.check_send(channel, topic, targets, msg, secure)  # raises: no keys
        if self._state != "started":
            raise CellError(f"cell {self._fqcn!r} is not running: await start() first")
        return self._core.check_send(channel, topic, targets, msg, secure)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise CellError(f"cell {self._fqcn!r} belongs to another event loop")
        return loop

    # ---------------------------------------------------------------- the socket

    def _open_socket(self) -> None:
        assert self._loop is not None
        self._sock, self._monitor = new_dealer(
            self._ctx, self.broker_url, self._conf.keys, self._conf.broker_key
        )
        self._fds = [int(self._sock.getsockopt(zmq.FD))]
        self._loop.add_reader(self._fds[0], self._on_readable)
        if self._monitor is not None:
            self._fds.append(int(self._monitor.getsockopt(zmq.FD)))
            self._loop.add_reader(self._fds[1], self._on_monitor)
        self._stalled = None

    def _close_socket(self, linger_ms: int) -> None:
        assert self._loop is not None and self._sock is not None
        for fd in self._fds:
            self._loop.remove_reader(fd)
        self._fds = []
        close_dealer(self._sock, self._monitor, linger_ms)
        self._sock = self._monitor = None

    def _wake(self) -> None:
        """The core queued frames: send them now on the loop, or ask the loop to."""
        if threading.get_ident() == self._loop_ident:
            if not self._busy:
                self._flush()
            return
        if self._woken or self._loop is None:
            return
        self._woken = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the cell stopped
            self._loop.call_soon_threadsafe(self._on_woken)

    def _on_woken(self) -> None:
        self._woken = False  # before the flush: a later wake() schedules another
        self._flush()

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = None
        if self._sock is None:
            return
        now = time.monotonic()
        self._busy = True
        try:
            act = self._core.on_tick(now)
            self._links.tick(now)
            if act.reconnect:
                self._close_socket(0)
                if len(self.broker_urls) > 1:
                    self._url_index = (self._url_index + 1) % len(self.broker_urls)
                    log.info("cell %s: trying broker %s", self._fqcn, self.broker_url)
                self._open_socket()
                self._core.socket_replaced(now)
            self._apply(act)
        finally:
            self._busy = False
        self._flush()
        wait = min(_TICK_MAX, max(0.001, self._core.session.next_deadline() - now))
        every = self._links.tick_every()
        if every is not None:
            wait = min(wait, every)
        if self._state == "started" and not self.refused:
            self._timer = self._loop.call_later(wait, self._tick)

    def _apply(self, act: Action) -> None:
        assert self._sock is not None and self._ready is not None
        assert self._connected is not None
        for frames in act.send:
            with contextlib.suppress(zmq.Again):
                self._sock.send_multipart(frames, zmq.NOBLOCK)
        if act.registered:
            again = " again" if self._ready.is_set() else ""
            log.info("cell %s registered%s with broker %s", self._fqcn, again, self.broker_url)
            self._connected.set()
            self.threaded.connected.set()
            self._ready.set()
        if act.lost:
            self._connected.clear()
            self.threaded.connected.clear()
            log.warning("cell %s lost the broker: %s; reconnecting", self._fqcn, act.lost)
        if act.refused:
            self.refused = act.refused
            self._ready.set()

    def _on_readable(self) -> None:
        self._read_scheduled = False
        sock = self._sock
        if sock is None:
            return
        core = self._core
        self._busy = True
        try:
            for frames in ready_messages(sock, _DRAIN):
                act = core.on_frames(frames, time.monotonic())
                if act is not None:
                    self._apply(act)
        finally:
            self._busy = False
        self._flush()
        # The session's deadline may have moved earlier (e.g. a standby said so).
        self._tick_within(self._core.session.next_deadline() - time.monotonic())

    def _tick_within(self, due_in: float) -> None:
        """Have the next tick come within `due_in` seconds."""
        timer, loop = self._timer, self._loop
        if timer is not None and loop is not None and due_in < timer.when() - loop.time() - 0.001:
            timer.cancel()
            self._timer = loop.call_later(max(0.0, due_in), self._tick)

    def _on_links(self) -> None:
        """A link socket's descriptor said something changed (or a flush saw work left)."""
        self._links_scheduled = False
        if self._sock is None:
            return
        self._busy = True
        try:
            self._links.drain()
        finally:
            self._busy = False
        self._flush()

    def _flush_links(self) -> None:
        links = self._links
        busy, self._busy = self._busy, True  # a hook run from here may queue: no re-entry
        try:
            links.tick(time.monotonic())  # sockets for links opened or closed meanwhile
            links.flush()
        finally:
            self._busy = busy
        every = links.tick_every()
        if every is not None:
            self._tick_within(every)  # a new link says LINK until it is answered
        if not self._links_scheduled and links.pending():
            self._links_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._on_links)

    def _flush(self) -> None:
        """Send what the core queued, without blocking; then look at EVENTS again."""
        sock = self._sock
        if sock is None:
            return
        self._flush_links()  # first: a link taken down gives its queue to the broker
        out = self._core.out
        if not self._core.registered:
            out.clear()  # requests made while unregistered already failed
            return
        stats = self._core.stats
        while True:
            frames = (
                self._stalled if self._stalled is not None else (out.popleft() if out else None)
            )
            if frames is None:
                break
            try:
                send_frames(sock, frames)
            except zmq.Again:
                self._stalled = frames  # POLLOUT comes through the same descriptor
                break
            self._stalled = None
            stats["sent"] += 1
        # The descriptor only signals changes, and our sends may have consumed one.
        events = zmq_events(sock)
        ready = events & POLLIN or (self._stalled is not None and events & POLLOUT)
        if ready and not self._read_scheduled:
            self._read_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _on_monitor(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        if self.handshake.read(monitor):
            assert self._ready is not None
            if not self._ready.is_set():
                self._ready.set()
            else:
                log.error(
                    "cell %s: the broker at %s refused this cell's key on reconnect",
                    self._fqcn,
                    self.broker_url,
                )
        if zmq_events(monitor) & POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._on_monitor)


def _settle(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class _LoopPoller:
    """Watches the descriptors of a cell's link sockets on its loop (their ``Poller``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        self._loop = loop
        self._on_readable = on_readable
        self._fds: dict[zmq.Socket, int] = {}

    def register(self, socket: zmq.Socket, flags: int = POLLIN) -> None:
        if socket not in self._fds:
            self._fds[socket] = fd = int(socket.getsockopt(zmq.FD))
            self._loop.add_reader(fd, self._on_readable)

    def unregister(self, socket: zmq.Socket) -> None:
        fd = self._fds.pop(socket, None)
        if fd is not None:  # before the socket closes: its number may be reused at once
            self._loop.remove_reader(fd)
