"""Child processes for the broker memory tests (spawned, never forked)."""

from __future__ import annotations

from typing import Any

__all__ = ["big_reply_owner_main", "stats_broker_main"]


def stats_broker_main(kwargs: dict[str, Any], conn: Any) -> None:
    """Run a Broker with `kwargs`; send its url, then answer "stats" until "stop"."""
    from broker import Broker

    with Broker("tcp://127.0.0.1:*", **kwargs) as b:
        conn.send(b.url)
        while conn.poll(120):
            if conn.recv() == "stop":
                break
            conn.send(b.stats())


def big_reply_owner_main(url: str, reply_bytes: int, offer_size: int, conn: Any) -> None:
    """Cell "owner": every ("attack", "chunk") request gets `reply_bytes` of zeros;
    `offer_size` zero bytes are offered with offer_bytes. Sends the ref; "stop" ends it;
    each other command is answered with how many big replies the handler made."""
    import threading

    from objdl.cell import Cell
    from objdl.message import Message
    from objdl.objects import offer_bytes

    blob = bytes(reply_bytes)
    answered = 0
    lock = threading.Lock()

    def chunk(request: Message) -> Message:
        nonlocal answered
        with lock:
            answered += 1
        return Message(payload=blob)

    with Cell("owner", url) as cell:
        cell.register_request_cb("attack", "chunk", chunk)
        conn.send(offer_bytes(cell, bytes(offer_size)))
        while conn.poll(120):
            if conn.recv() == "stop":
                break
            with lock:
                conn.send(answered)
