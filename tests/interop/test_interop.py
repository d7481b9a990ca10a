"""A cell written from docs/PROTOCOL.md alone (rawcell.py) against objdl's broker and cells."""

from __future__ import annotations

import ast
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash

from objdl.cell import Cell
from objdl.downloader import ObjDownloader
from objdl.message import Message
from objdl.objects import download_bytes, download_file, offer_bytes, offer_file
from tests.conftest import wait_for
from tests.interop.rawcell import RawCell, decode, raw_download, raw_seed_download, serve_bytes

CHUNK = 64 * 1024
RAWCELL = Path(__file__).with_name("rawcell.py")


def test_rawcell_imports_nothing_of_objdl() -> None:
    allowed = {"__future__", "struct", "threading", "time", "typing", "msgpack", "xxhash", "zmq"}
    imported = set()
    for node in ast.walk(ast.parse(RAWCELL.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert imported <= allowed, imported - allowed


@pytest.fixture
def owner(broker: Any) -> Any:
    cell = Cell("owner", broker.url)
    cell.start()
    try:
        yield cell
    finally:
        ObjDownloader.shutdown()
        cell.stop()


@pytest.fixture
def raw(broker: Any) -> Any:
    cell = RawCell("raw-site", broker.url)
    try:
        yield cell
    finally:
        cell.close()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 7 * CHUNK + 5])
def test_raw_site_downloads_bytes_from_objdl_owner(owner: Cell, raw: RawCell, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    done: list[str] = []
    ref = offer_bytes(
        owner, data, chunk_size=CHUNK, obj_downloaded_cb=lambda r, s, st, o: done.append(st)
    )
    got, desc, most = raw_download(raw, "owner", ref, window=4, chunk=CHUNK)
    assert got == data
    assert desc["digest"] == xxhash.xxh3_128(data).hexdigest()
    assert desc["size"] == size and desc["meta"] is None
    if size > 4 * CHUNK:
        assert most == 4  # a window of requests was in flight at once
    wait_for(lambda: done == ["success"])


def test_raw_site_downloads_a_file_from_objdl_owner(
    owner: Cell, raw: RawCell, tmp_path: Path
) -> None:
    data = bytes(reversed(range(256))) * (5 * CHUNK // 256) + b"tail"
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    ref = offer_file(owner, path, chunk_size=CHUNK)
    got, desc, most = raw_download(raw, "owner", ref, window=3, chunk=4 * CHUNK)
    assert got == data and desc["meta"] == {"name": "model.bin"}
    assert desc["chunk"] == CHUNK and most == 3  # the owner's chunk caps the request


def test_raw_site_one_at_a_time(owner: Cell, raw: RawCell) -> None:
    data = b"seed-" * (3 * CHUNK // 5 + 1)
    ref = offer_bytes(owner, data, chunk_size=CHUNK)
    assert raw_seed_download(raw, "owner", ref) == data


def test_raw_site_gets_invalid_request_for_an_unknown_ref(owner: Cell, raw: RawCell) -> None:
    with pytest.raises(RuntimeError, match="invalid_request"):
        raw_download(raw, "owner", "no-such-ref")


DATA = bytes(range(251)) * (6 * CHUNK // 251)


@pytest.fixture
def raw_owner(broker: Any) -> Any:
    """A raw cell serving `DATA` as ref "raw-ref"; yields the states it is asked for."""
    cell = RawCell("raw-owner", broker.url)
    stop = threading.Event()
    seen: list[dict[str, Any]] = []
    t = threading.Thread(target=serve_bytes, args=(cell, "raw-ref", DATA, stop, CHUNK, seen))
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join(10)
        cell.close()


def test_objdl_site_downloads_bytes_from_raw_owner(cells: Any, raw_owner: Any) -> None:
    _, site = cells
    assert download_bytes(site, "raw-owner", "raw-ref", window=4, chunk_size=CHUNK) == DATA
    # It asked as PROTOCOL.md says: the first request, every chunk once, the final one.
    assert raw_owner[0] == {"length": CHUNK}
    assert raw_owner[-1] == {"offset": len(DATA), "ok": True, "reason": ""}
    chunks = raw_owner[1:-1]
    assert sorted(s["offset"] for s in chunks) == list(range(CHUNK, len(DATA), CHUNK))
    assert all(s["length"] == min(CHUNK, len(DATA) - s["offset"]) for s in chunks)


def test_objdl_site_downloads_a_file_from_raw_owner(
    cells: Any, raw_owner: Any, tmp_path: Path
) -> None:
    _, site = cells
    dest = tmp_path / "out.bin"
    download_file(site, "raw-owner", "raw-ref", dest, window=4, chunk_size=2 * CHUNK)
    assert dest.read_bytes() == DATA
    assert raw_owner[1]["length"] == CHUNK  # the descriptor's chunk capped the site's


# -- requests that do not decode (PROTOCOL.md: answered invalid_request) --------------


@pytest.fixture
def target(broker: Any) -> Any:
    cell = Cell("target", broker.url)
    cell.register_request_cb("t", "echo", lambda req: Message(payload=req.payload))
    cell.start()
    try:
        yield cell
    finally:
        cell.stop()


def headers(req_id: Any, mtype: str = "req") -> bytes:
    return msgpack.packb({"msg_type": mtype, "req_id": req_id, "channel": "t", "topic": "echo"})


UNDECODABLE = {
    "truncated msgpack": [msgpack.packb({"a": [1, 2, 3]})[:-1]],
    "unknown ext type": [msgpack.packb(msgpack.ExtType(9, b"x"))],
    "timestamp ext": [msgpack.packb(msgpack.Timestamp(1))],
    "buffer index out of range": [msgpack.packb(msgpack.ExtType(1, struct.pack(">I", 3))), b"b"],
    "unreferenced buffer": [msgpack.packb({"a": 1}), b"stray"],
    "missing body frame": [],
}


def reply_to(raw: RawCell, frames: list[bytes]) -> tuple[dict[str, Any], Any]:
    raw.send([b"MSG", b"target", *frames])
    got = raw.recv_any(5.0)
    assert got is not None, "no reply: the requester would wait for its timeout"
    _, hdrs, body = decode(got)
    return hdrs, body


@pytest.mark.parametrize("req_id", [7, "r-7", b"\x07", 0])
@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_undecodable_request_is_answered_invalid_request(
    target: Cell, raw: RawCell, case: str, req_id: Any
) -> None:
    hdrs, _ = reply_to(raw, [headers(req_id), *UNDECODABLE[case]])
    assert hdrs["return_code"] == "invalid_request"
    assert hdrs["error"].startswith("request did not decode: ")
    assert hdrs["req_id"] == req_id and type(hdrs["req_id"]) is type(req_id)


@pytest.mark.parametrize("req_id", [1, "abc", b"id", 0, 2**63])
def test_reply_echoes_req_id_of_any_type(target: Cell, raw: RawCell, req_id: Any) -> None:
    hdrs, body = reply_to(raw, [headers(req_id), msgpack.packb({"x": 1})])
    assert hdrs["return_code"] == "ok" and body == {"x": 1}
    assert hdrs["req_id"] == req_id and type(hdrs["req_id"]) is type(req_id)


def test_fire_gets_no_reply_even_when_it_does_not_decode(target: Cell, raw: RawCell) -> None:
    raw.send([b"MSG", b"target", headers(None, "fire"), msgpack.packb({"x": 1})])
    raw.send([b"MSG", b"target", headers(None, "fire"), b"\x92"])
    hdrs, _ = reply_to(raw, [headers("after"), msgpack.packb(None)])
    assert hdrs["req_id"] == "after"  # the first answer is the request's
    assert raw.recv_any(0.3) is None


def test_list_matches_whole_segments_and_may_be_empty(broker: Any, raw: RawCell) -> None:
    extra = [RawCell(n, broker.url) for n in ("site-1", "site-1.job", "site-10")]
    try:
        raw.send([b"LIST", b"tok", b"site-1"])
        assert raw.recv_control(5.0)[1] == [b"LIST_R", b"tok", b"site-1\nsite-1.job"]
        raw.send([b"LIST", b"t2", b"nobody"])
        assert raw.recv_control(5.0)[1] == [b"LIST_R", b"t2", b""]
    finally:
        for c in extra:
            c.close()
