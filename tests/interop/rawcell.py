"""A minimal cell written from docs/PROTOCOL.md alone, with pyzmq, msgpack and xxhash.

It imports nothing from objdl, broker or tests (test_interop.py checks): it is the
proof that the document is enough to talk to objdl's broker, owners and sites. It
registers, answers PING, heartbeats, sends requests and replies, downloads a sized
object with a window of requests in flight, and serves one.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import msgpack
import xxhash
import zmq

__all__ = ["RawCell", "decode", "raw_download", "raw_seed_download", "serve_bytes"]

CHANNEL, TOPIC = "obj_downloader__", "obj_downloader__download"
EXT_BUFFER = 1
HEARTBEAT = 0.5


class RawCell:
    """One DEALER connection to the broker, registered under `name`."""

    def __init__(self, name: str, url: str, timeout: float = 5.0) -> None:
        self.name = name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)
        self.next_id = 1
        self.last_hb = 0.0
        self.send([b"REG", b"1", name.encode()])
        kind, frames = self.recv_control(timeout)
        if kind != b"REG_OK":
            self.close()
            raise RuntimeError(f"registration refused: {frames}")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)

    def recv_any(self, timeout: float) -> list[zmq.Frame] | None:
        """The next MSG, NACK, LIST_R, REG_OK or REG_ERR; PING and HB handled here."""
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now - self.last_hb >= HEARTBEAT:
                self.send([b"HB"])
                self.last_hb = now
            left = min(end - now, HEARTBEAT)
            if left <= 0:
                return None
            if not self.sock.poll(int(left * 1000) + 1):
                continue
            frames = self.sock.recv_multipart(copy=False)
            kind = frames[0].bytes
            if kind == b"PING":
                self.send([b"HB"])
            elif kind != b"HB":
                return frames

    def recv_control(self, timeout: float) -> tuple[bytes, list[bytes]]:
        frames = self.recv_any(timeout)
        if frames is None:
            raise TimeoutError("no answer from the broker")
        return frames[0].bytes, [f.bytes for f in frames]

    # -- messages ----------------------------------------------------------------

    def send_msg(self, dest: str, headers: dict[str, Any], body: Any, buffers: list[Any]) -> None:
        frames = [b"MSG", dest.encode(), msgpack.packb(headers), msgpack.packb(body)]
        self.send(frames + buffers)

    def request(self, dest: str, body: Any, buffers: list[Any] | None = None) -> Any:
        """Send a download-channel request; return its req_id."""
        req_id = self.next_id
        self.next_id += 1
        headers = {"msg_type": "req", "req_id": req_id, "channel": CHANNEL, "topic": TOPIC}
        self.send_msg(dest, headers, body, buffers or [])
        return req_id

    def reply(self, dest: str, request: dict[str, Any], rc: str, body: Any, buffers: list) -> None:
        headers = {"msg_type": "rep", "req_id": request["req_id"], "return_code": rc}
        self.send_msg(dest, headers, body, buffers)


def decode(frames: list[zmq.Frame]) -> tuple[str, dict[str, Any], Any]:
    """A received MSG as (origin, headers, body); ext 1 becomes its buffer frame's bytes."""
    buffers = [f.buffer for f in frames[4:]]

    def ext(code: int, data: bytes) -> Any:
        if code != EXT_BUFFER:
            raise ValueError(f"ext type {code} not handled by this client")
        return buffers[struct.unpack(">I", data)[0]]

    headers = msgpack.unpackb(frames[2].bytes)
    body = msgpack.unpackb(frames[3].bytes, ext_hook=ext) if len(frames) > 3 else None
    return frames[1].bytes.decode(), headers, body


def pieces(data: Any) -> list[bytes]:
    """A chunk's `data`: bin, ext 1, or an array of those, joined in order."""
    return [bytes(p) for p in data] if isinstance(data, list) else [bytes(data)]


def raw_download(
    cell: RawCell, owner: str, ref_id: str, window: int = 4, chunk: int = 1 << 16
) -> tuple[bytes, dict[str, Any], int]:
    """Download a sized object with up to `window` chunk requests in flight.

    Returns the bytes, the descriptor and the most requests seen in flight at once.
    Raises RuntimeError on any answer other than the ones the document promises.
    """
    waiting: dict[Any, int] = {}  # req_id -> offset

    def answer() -> dict[str, Any]:
        frames = cell.recv_any(10.0)
        if frames is None or frames[0].bytes != b"MSG":
            raise RuntimeError(f"no reply from {owner}: {frames and frames[0].bytes!r}")
        _, headers, body = decode(frames)
        if headers.get("return_code") != "ok" or body.get("status") == "error":
            raise RuntimeError(f"owner answered {headers} {body}")
        body["req_id"] = headers["req_id"]
        return body

    cell.request(owner, {"ref_id": ref_id, "state": {"length": chunk}})
    reply = answer()
    desc = reply["state"]
    size, chunk = desc["size"], min(chunk, desc["chunk"])
    parts: dict[int, bytes] = {0: b"".join(pieces(reply["data"]))}
    offset, most = len(parts[0]), 0
    while offset < size or waiting:
        while offset < size and len(waiting) < window:
            n = min(chunk, size - offset)
            rid = cell.request(owner, {"ref_id": ref_id, "state": {"offset": offset, "length": n}})
            waiting[rid] = offset
            offset += n
        most = max(most, len(waiting))
        reply = answer()
        at = waiting.pop(reply["req_id"])
        parts[at] = b"".join(pieces(reply["data"]))
    data = b"".join(parts[k] for k in sorted(parts))
    ok = len(data) == size and xxhash.xxh3_128(data).hexdigest() == desc["digest"]
    state = {"offset": size, "ok": ok, "reason": "" if ok else "digest mismatch"}
    cell.request(owner, {"ref_id": ref_id, "state": state})
    if answer()["status"] != "eof":
        raise RuntimeError("the final request was not answered eof")
    return data, desc, most


def raw_seed_download(cell: RawCell, owner: str, ref_id: str) -> bytes:
    """The one-at-a-time exchange, by offset: one request, one reply, until eof."""
    body: dict[str, Any] = {"ref_id": ref_id}  # no state on the first request
    out: list[bytes] = []
    while True:
        cell.request(owner, body)
        frames = cell.recv_any(10.0)
        if frames is None:
            raise TimeoutError(f"no reply from {owner}")
        _, headers, reply = decode(frames)
        if headers.get("return_code") != "ok" or reply["status"] == "error":
            raise RuntimeError(f"owner answered {headers} {reply}")
        if reply["status"] == "eof":
            return b"".join(out)
        out.extend(pieces(reply["data"]))
        body = {"ref_id": ref_id, "state": {"offset": sum(map(len, out))}}


def serve_bytes(
    cell: RawCell,
    ref_id: str,
    data: bytes,
    stop: threading.Event,
    chunk: int = 1 << 16,
    seen: list[dict[str, Any]] | None = None,
) -> None:
    """Serve `data` as sized object `ref_id` until `stop`; note each request's state in `seen`."""
    desc = {
        "offset": 0,
        "size": len(data),
        "chunk": chunk,
        "algo": "xxh3_128",
        "digest": xxhash.xxh3_128(data).hexdigest(),
        "meta": None,
    }
    seen = [] if seen is None else seen
    while not stop.is_set():
        frames = cell.recv_any(0.1)
        if frames is None or frames[0].bytes != b"MSG":
            continue
        origin, headers, body = decode(frames)
        if headers.get("msg_type") != "req":
            continue
        if not isinstance(body, dict) or body.get("ref_id") != ref_id:
            cell.reply(origin, headers, "invalid_request", None, [])
            continue
        state = body.get("state") or {}
        seen.append(state)
        n = min(state.get("length", chunk), chunk)
        offset = state.get("offset")
        if offset is not None and not 0 <= offset <= len(data):
            cell.reply(origin, headers, "invalid_request", None, [])
            continue
        if offset is None:  # the first request: the descriptor and the first chunk
            out, reply_state = data[:n], desc
        elif offset == len(data):  # the final request
            status = "eof" if state.get("ok", True) is not False else "error"
            cell.reply(origin, headers, "ok", {"status": status, "error": ""}, [])
            continue
        else:
            out = data[offset : offset + n]
            reply_state = {"offset": offset + len(out)}
        body = {
            "status": "ok",
            "state": reply_state,
            "data": msgpack.ExtType(EXT_BUFFER, b"\0\0\0\0"),
        }
        cell.reply(origin, headers, "ok", body, [out])
