"""A hostile owner against the site: crafted replies must end in download_failed, cleanly.

The owner here is a real cell on the downloader's channel and topic that answers
with bodies made by hand: honest ones, then each field twisted in turn. Whatever it
sends, download_bytes/download_dict/download_file must raise DownloadError with a
reason (so the consumer's download_failed ran), leave no part file and no open
descriptor, and hold far less memory than the owner claims.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import Broker
from objdl.cell import Cell
from objdl.downloader import OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, ProduceRC
from objdl.downloader._reply import (
    BadReply,
    Descriptor,
    check_chunk_state,
    chunk_pieces,
    parse_descriptor,
)
from objdl.downloader.sized import DIGESTS, MAX_CHUNK_SIZE
from objdl.message import Message, MessageHeaderKey, ReturnCode, make_reply
from objdl.objects import (
    DEFAULT_MAX_MEMORY_SIZE,
    DictSource,
    DownloadError,
    ObjectProducer,
    download_bytes,
    download_dict,
    download_file,
    offer_bytes,
    offer_dict,
)
from tests._procs import PeakRss
from tests.conftest import reference_digest, wait_for

CHUNK = 4096
SITE_KW: dict[str, Any] = {
    "window": 4,
    "chunk_size": CHUNK,
    "per_request_timeout": 5.0,
    "tries": 2,
    "backoff": 0.01,
}
DICT = {"w": np.arange(3 * CHUNK, dtype=np.float32).reshape(3, CHUNK), "name": "layer-1"}
_src = DictSource(DICT)
DATA = b"".join(bytes(p) for p in _src.read(0, _src.size))  # the dict's packed stream
GiB = 1024**3

Body = Any  # a reply payload, or a whole Message
Answer = Callable[["HostileOwner", Any], Body]


class HostileOwner:
    """A real cell answering download requests with `answer(owner, state)`.

    `answer` returns a payload (sent with return code ok) or a whole Message.
    Data requests and cancels are counted apart.
    """

    def __init__(self, url: str, name: str = "evil") -> None:
        self.cell = Cell(name, url)
        self.data = DATA
        self.answer: Answer = honest
        self.requests: list[Any] = []
        self.cancels: list[str] = []
        self.cell.register_request_cb(OBJ_DOWNLOADER_CHANNEL, OBJ_DOWNLOADER_TOPIC, self._handle)

    def reset(self, answer: Answer, data: bytes = DATA) -> None:
        self.answer, self.data = answer, data
        self.requests, self.cancels = [], []

    def _handle(self, request: Message) -> Message | None:
        payload = request.payload
        if isinstance(payload, dict) and "cancel" in payload:
            self.cancels.append(payload["cancel"])
            return None
        state = payload.get("state")
        self.requests.append(state)
        body = self.answer(self, state)
        return body if isinstance(body, Message) else make_reply(ReturnCode.OK, body=body)

    def describe(self) -> dict[str, Any]:
        return {
            "offset": 0,
            "size": len(self.data),
            "chunk": CHUNK,
            "algo": "xxh3_128",
            "digest": reference_digest("xxh3_128", self.data),
            "meta": None,
        }


def honest(owner: HostileOwner, state: Any) -> Body:
    """What a correct owner answers (the sized exchange of objdl.downloader.sized)."""
    state = state or {}
    size = len(owner.data)
    length = min(state.get("length", CHUNK), CHUNK)
    if "offset" not in state:
        return {"status": ProduceRC.OK, "state": owner.describe(), "data": owner.data[:length]}
    offset = state["offset"]
    if offset == size:
        if state.get("ok"):
            return {"status": ProduceRC.EOF}
        return {"status": ProduceRC.ERROR, "error": state.get("reason", "")}
    if not 0 <= offset < size:
        return make_reply(ReturnCode.INVALID_REQUEST, f"offset {offset} is outside the object")
    n = min(length, size - offset)
    return {
        "status": ProduceRC.OK,
        "state": {"offset": offset + n},
        "data": owner.data[offset:][:n],
    }


def is_first(state: Any) -> bool:
    return not state or "offset" not in state


def at_first(twist: Callable[[dict], Body]) -> Answer:
    """Honest, except the first reply, which `twist` rewrites."""

    def answer(owner: HostileOwner, state: Any) -> Body:
        body = honest(owner, state)
        return twist(body) if is_first(state) else body

    return answer


def at_later(twist: Callable[[dict, dict], Body]) -> Answer:
    """Honest, except chunk replies after the first, which `twist(body, state)` rewrites."""

    def answer(owner: HostileOwner, state: Any) -> Body:
        body = honest(owner, state)
        if is_first(state) or state["offset"] >= len(owner.data):
            return body
        return twist(body, state)

    return answer


def with_(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda body: {**body, key: value}


def desc_with(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda body: {**body, "state": {**body["state"], key: value}}


def desc_without(key: str) -> Callable[[dict], dict]:
    return lambda body: {**body, "state": {k: v for k, v in body["state"].items() if k != key}}


def nested(depth: int) -> list:
    root: list = []
    node = root
    for _ in range(depth):
        child: list = []
        node.append(child)
        node = child
    return root


def rc_header(value: Any) -> Callable[[dict], Message]:
    def twist(body: dict) -> Message:
        return Message({MessageHeaderKey.RETURN_CODE: value}, body)

    return twist


# (id, answer, a fragment the reason must contain)
CASES: list[tuple[str, Answer, str]] = [
    # the first reply's data
    ("data-int", at_first(with_("data", 7)), "chunk data must be bytes"),
    ("data-str", at_first(with_("data", "abcd")), "chunk data must be bytes"),
    ("data-dict", at_first(with_("data", {"a": b"x"})), "chunk data must be bytes"),
    ("data-list-of-int", at_first(with_("data", [1, 2, 3])), "chunk data must be bytes"),
    ("data-list-of-str", at_first(with_("data", ["ab"])), "chunk data must be bytes"),
    ("data-nested-list", at_first(with_("data", [[b"ab"]])), "chunk data must be bytes"),
    ("data-none", at_first(with_("data", None)), "sent 0 bytes at offset 0"),
    ("data-short", at_first(lambda b: {**b, "data": b["data"][:-1]}), "expected 4096"),
    ("data-long", at_first(lambda b: {**b, "data": b["data"] + b"x"}), "expected 4096"),
    # the first reply's status, payload and headers
    ("status-int", at_first(with_("status", 1)), "status that is not a str"),
    ("status-none", at_first(with_("status", None)), "status that is not a str"),
    ("status-list", at_first(with_("status", ["ok"])), "status that is not a str"),
    ("status-unknown", at_first(with_("status", "okay")), "unknown status"),
    ("status-eof-first", at_first(with_("status", "eof")), "before describing it"),
    (
        "status-error-dict",
        at_first(lambda b: {"status": "error", "error": {"x": 1}}),
        "producer error",
    ),
    ("payload-list", at_first(lambda b: [1, 2]), "without a payload dict"),
    ("payload-none", at_first(lambda b: None), "without a payload dict"),
    ("rc-int", at_first(rc_header(5)), "error requesting data"),
    ("rc-bytes", at_first(rc_header(b"ok")), "error requesting data"),
    # the description
    ("state-list", at_first(with_("state", [1])), "must describe the object"),
    ("state-none", at_first(with_("state", None)), "must describe the object"),
    ("size-missing", at_first(desc_without("size")), "lacks size"),
    ("size-str", at_first(desc_with("size", "10")), "size must be an int"),
    ("size-negative", at_first(desc_with("size", -1)), "size must be an int"),
    ("size-bool", at_first(desc_with("size", True)), "size must be an int"),
    ("size-float", at_first(desc_with("size", 10.0)), "size must be an int"),
    ("size-2**64-1", at_first(desc_with("size", 2**64 - 1)), "size must be an int"),
    ("size-smaller", at_first(desc_with("size", 10)), "expected 10"),
    ("chunk-zero", at_first(desc_with("chunk", 0)), "chunk must be an int"),
    ("chunk-negative", at_first(desc_with("chunk", -5)), "chunk must be an int"),
    ("chunk-too-big", at_first(desc_with("chunk", MAX_CHUNK_SIZE + 1)), "chunk must be an int"),
    ("chunk-str", at_first(desc_with("chunk", "4096")), "chunk must be an int"),
    ("chunk-missing", at_first(desc_without("chunk")), "lacks chunk"),
    ("algo-unknown", at_first(desc_with("algo", "md5")), "algo must be one of"),
    ("algo-int", at_first(desc_with("algo", 3)), "algo must be one of"),
    ("algo-list", at_first(desc_with("algo", ["sha256"])), "algo must be one of"),
    ("digest-short", at_first(lambda b: desc_with("digest", "ab" * 15)(b)), "32 lowercase hex"),
    ("digest-sha256-length", at_first(desc_with("digest", "a" * 64)), "32 lowercase hex"),
    ("digest-not-hex", at_first(desc_with("digest", "z" * 32)), "32 lowercase hex"),
    ("digest-int", at_first(desc_with("digest", 5)), "digest must be a hex str"),
    ("digest-missing", at_first(desc_without("digest")), "lacks digest"),
    ("digest-wrong", at_first(desc_with("digest", "0" * 32)), "digest mismatch"),
    ("meta-huge", at_first(desc_with("meta", "m" * 200_000)), "meta is larger than"),
    ("meta-deep", at_first(desc_with("meta", nested(40))), "meta nests deeper"),
    ("meta-array", at_first(desc_with("meta", np.zeros(3))), "meta may hold only plain"),
    ("offset-nonzero", at_first(desc_with("offset", 4096)), "offset must be 0"),
    # later chunk replies
    ("later-data-int", at_later(lambda b, s: {**b, "data": 7}), "chunk data must be bytes"),
    ("later-data-str", at_later(lambda b, s: {**b, "data": "abc"}), "chunk data must be bytes"),
    ("later-data-dict", at_later(lambda b, s: {**b, "data": {}}), "chunk data must be bytes"),
    ("later-data-ints", at_later(lambda b, s: {**b, "data": [1]}), "chunk data must be bytes"),
    ("later-no-data", at_later(lambda b, s: {**b, "data": None}), "sent 0 bytes"),
    ("later-short", at_later(lambda b, s: {**b, "data": b["data"][:-1]}), "expected 4096"),
    ("later-long", at_later(lambda b, s: {**b, "data": b["data"] + b"x"}), "expected 4096"),
    ("later-eof", at_later(lambda b, s: {"status": "eof"}), "ended the object early"),
    ("later-status-int", at_later(lambda b, s: {**b, "status": 0}), "status that is not a str"),
    ("later-state-none", at_later(lambda b, s: {**b, "state": None}), "not a dict"),
    (
        "later-state-offset-str",
        at_later(lambda b, s: {**b, "state": {"offset": "8192"}}),
        "an answer to another request",
    ),
    (
        # the bytes and state of another chunk than the one asked for
        "later-other-offset",
        at_later(lambda b, s: {**b, "state": {"offset": CHUNK}, "data": DATA[:CHUNK]}),
        "an answer to another request",
    ),
    (
        # another chunk's bytes under the asked chunk's state: only the digest can tell
        "later-other-bytes",
        at_later(lambda b, s: {**b, "data": DATA[: len(b["data"])]}),
        "digest mismatch",
    ),
    (
        "later-size-changed",
        at_later(lambda b, s: {**b, "state": {**b["state"], "size": len(DATA) + 1}}),
        "size changed mid-download",
    ),
    (
        "later-digest-changed",
        at_later(lambda b, s: {**b, "state": {**b["state"], "digest": "0" * 32}}),
        "digest changed mid-download",
    ),
    (
        "later-rc-int",
        at_later(lambda b, s: Message({MessageHeaderKey.RETURN_CODE: 3}, b)),
        "error requesting data",
    ),
]


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[Broker, Cell, HostileOwner]]:
    """One broker, one site and one hostile owner for the whole module (the cases are many)."""
    b = Broker("tcp://127.0.0.1:*")
    b.start()
    evil = HostileOwner(b.url)
    site = Cell("site-1", b.url)
    try:
        evil.cell.start()
        site.start()
        # Big messages both ways once first: pyzmq opens descriptors for its zero-copy
        # sends on first use, which the descriptor counts below must not mistake for leaks.
        evil.cell.register_request_cb("warm", "echo", lambda req: Message(payload=req.payload))
        reply = site.send_request("warm", "evil", "echo", Message(payload=b"x" * 2**20), 10.0)
        assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK
        yield b, site, evil
    finally:
        site.stop()
        evil.cell.stop()
        b.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_into(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def attack(kind: str, site: Cell, tmp_path: Path, **kw: Any) -> Any:
    """Run one download helper against the owner "evil"; return what it returns."""
    kw = {**SITE_KW, **kw}
    if kind == "bytes":
        return download_bytes(site, "evil", "R1", **kw)
    if kind == "dict":
        return download_dict(site, "evil", "R1", **kw)
    return download_file(site, "evil", "R1", tmp_path / "dest.bin", **kw)


KINDS = ["bytes", "dict", "file"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_honest_answers_download(
    net: tuple[Broker, Cell, HostileOwner], kind: str, tmp_path: Path
) -> None:
    """The harness itself: with nothing twisted, every helper gets the object."""
    _, site, evil = net
    evil.reset(honest)
    got = attack(kind, site, tmp_path)
    if kind == "bytes":
        assert type(got) is bytearray and got == DATA
    elif kind == "dict":
        assert got["name"] == "layer-1"
        assert got["w"].dtype == np.float32 and got["w"].shape == (3, CHUNK)
        assert np.array_equal(got["w"], DICT["w"])
    else:
        assert (tmp_path / "dest.bin").read_bytes() == DATA


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("case", "answer", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_reply_fails_cleanly(
    net: tuple[Broker, Cell, HostileOwner],
    kind: str,
    case: str,
    answer: Answer,
    expected: str,
    tmp_path: Path,
) -> None:
    _, site, evil = net
    evil.reset(answer)
    before = open_fds()
    with pytest.raises(DownloadError) as info:
        attack(kind, site, tmp_path)
    assert expected in info.value.reason, info.value.reason
    assert len(info.value.reason) < 2000  # the owner cannot fill a log line
    assert list(tmp_path.iterdir()) == []  # no part file, no state file, no dest
    assert fds_into(tmp_path) == []
    wait_for(lambda: open_fds() <= before, timeout=2.0)


def test_a_huge_error_text_is_cut(net: tuple[Broker, Cell, HostileOwner], tmp_path: Path) -> None:
    _, site, evil = net
    evil.reset(lambda o, s: make_reply(ReturnCode.INVALID_REQUEST, "x" * 1_000_000))
    with pytest.raises(DownloadError, match="invalid_request") as info:
        attack("bytes", site, tmp_path)
    assert len(info.value.reason) < 1000


# Terminal controls: clear the screen, set the window title, turn text around, and a
# newline that would start a forged log line.
CONTROLS = "\x1b[2J\x1b]0;owned\x07\u202e\nobjdl: error: forged"


@pytest.mark.parametrize(
    "answer",
    [
        lambda o, s: make_reply(ReturnCode.INVALID_REQUEST, CONTROLS),
        lambda o, s: Message({MessageHeaderKey.RETURN_CODE: CONTROLS + "x" * 100_000}, {}),
        lambda o, s: {"status": ProduceRC.ERROR, "error": CONTROLS},
    ],
    ids=["error-text", "return-code", "producer-error"],
)
def test_owner_text_reaches_the_reason_escaped_and_cut(
    net: tuple[Broker, Cell, HostileOwner], answer: Answer, tmp_path: Path
) -> None:
    """What the owner writes ends up in a reason that `objdl get` prints and logs show:
    nothing in it may drive the terminal, and a 100 KB return code is cut."""
    _, site, evil = net
    evil.reset(answer)
    with pytest.raises(DownloadError) as info:
        attack("bytes", site, tmp_path)
    reason = info.value.reason
    assert reason.isprintable(), repr(reason)
    assert "\\x1b[2J" in reason  # still readable, as an escape
    assert len(reason) < 1000


def test_the_owners_file_name_is_not_a_path(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """A file's `meta` carries its name on the owner; the site writes only to its own
    destination, whatever name the owner says."""
    _, site, evil = net
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    evil.reset(at_first(desc_with("meta", {"name": "../../planted"})))
    download_file(site, "evil", "R1", inner / "dest.bin", **SITE_KW)
    assert (inner / "dest.bin").read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "dest.bin"]


def test_a_dict_stream_of_many_empty_frames_is_refused(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """The stream's table claims 100,000 empty frames (its lengths add up)."""
    _, site, evil = net
    n = 100_000
    stream = struct.pack(">I", n) + bytes(8 * n)
    evil.reset(honest, data=stream)
    with pytest.raises(DownloadError, match="holds 2 to"):
        attack("dict", site, tmp_path)


# --- what the owner claims is not what the site allocates ---------------------------------


def claim(size: int, pause: float = 0.0) -> Answer:
    """Describe `size` bytes, send one chunk, refuse everything after (after `pause` s)."""

    def answer(owner: HostileOwner, state: Any) -> Body:
        if is_first(state):
            desc = {**owner.describe(), "size": size, "digest": "0" * 32}
            return {"status": ProduceRC.OK, "state": desc, "data": owner.data[:CHUNK]}
        time.sleep(pause)  # while the site holds what it allocated
        return make_reply(ReturnCode.INVALID_REQUEST, "that is all there is")

    return answer


@pytest.mark.parametrize("kind", ["bytes", "dict"])
def test_a_1_gib_claim_backed_by_one_chunk_costs_little_memory(
    net: tuple[Broker, Cell, HostileOwner], kind: str, tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(claim(GiB, pause=0.5))
    assert GiB < DEFAULT_MAX_MEMORY_SIZE  # within the default limit: the buffer is the defence
    with PeakRss() as rss, pytest.raises(DownloadError, match="that is all there is"):
        attack(kind, site, tmp_path, tries=1)
    assert rss.growth < 64 * 1024 * 1024, f"RSS grew by {rss.growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("kind", KINDS)
def test_max_size_refuses_before_a_second_request(
    net: tuple[Broker, Cell, HostileOwner], kind: str, tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(claim(100 * 1024))
    with pytest.raises(DownloadError, match="max_size=50000") as info:
        attack(kind, site, tmp_path, max_size=50_000)
    assert "102400 bytes" in info.value.reason
    assert len(evil.requests) == 1  # only the first: no chunk was asked for
    wait_for(lambda: len(evil.cancels) == 1)  # the owner was told why
    assert "max_size" in evil.cancels[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["bytes", "dict"])
def test_in_memory_default_refuses_a_claim_above_it(
    net: tuple[Broker, Cell, HostileOwner], kind: str, tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(claim(DEFAULT_MAX_MEMORY_SIZE + 1))
    with pytest.raises(DownloadError, match=f"max_size={DEFAULT_MAX_MEMORY_SIZE}"):
        attack(kind, site, tmp_path)
    assert len(evil.requests) == 1


def test_max_size_none_lifts_the_limit(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(claim(DEFAULT_MAX_MEMORY_SIZE + 1))
    with pytest.raises(DownloadError, match="that is all there is"):  # asked for more chunks
        attack("bytes", site, tmp_path, max_size=None, tries=1)
    assert len(evil.requests) > 1


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_max_size_must_be_a_non_negative_int(
    net: tuple[Broker, Cell, HostileOwner], bad: Any, tmp_path: Path
) -> None:
    _, site, _ = net
    with pytest.raises(ValueError, match="max_size"):
        attack("bytes", site, tmp_path, max_size=bad)


def test_legitimate_downloads_under_the_limit(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    data = os.urandom(3 * CHUNK + 17)
    ref = offer_bytes(owner, data, timeout=30.0)
    got = download_bytes(site, "server", ref, max_size=len(data), chunk_size=CHUNK, window=2)
    assert type(got) is bytearray and got == data
    with pytest.raises(DownloadError, match="max_size"):
        download_bytes(site, "server", ref, max_size=len(data) - 1)
    arrays = {"a": np.arange(10_000, dtype=np.int16).reshape(100, 100), "b": np.ones(3, ">f8")}
    ref = offer_dict(owner, arrays, timeout=30.0)
    back = download_dict(site, "server", ref, chunk_size=CHUNK)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v)


# --- more of what a hostile owner (or a bystander) can do ----------------------------------


def test_a_flood_of_replies_to_requests_never_made(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """Replies for unknown request ids, and a bystander forging replies with guessed
    ids, are dropped by the site's cell; the download gets the right bytes."""
    b, site, evil = net
    mallory = Cell("mallory", b.url)
    mallory.start()
    rng = random.Random(7)
    sent = 0

    def forge(cell: Cell, req_id: int) -> None:
        fake = Message(
            {
                MessageHeaderKey.CHANNEL: OBJ_DOWNLOADER_CHANNEL,
                MessageHeaderKey.TOPIC: OBJ_DOWNLOADER_TOPIC,
                MessageHeaderKey.REQ_ID: req_id,
            }
        )
        junk = {"status": "ok", "state": {"offset": 0, "size": 1}, "data": 12345}
        cell._core.send_reply(make_reply(ReturnCode.OK, body=junk), fake, "site-1", False)

    def flooding(owner: HostileOwner, state: Any) -> Body:
        nonlocal sent
        for _ in range(50):
            forge(evil.cell, rng.randrange(10**9, 2**62))  # ids the site never used
            forge(mallory, rng.randrange(0, 5000))  # ids it may be using, from another cell
            sent += 2
        return honest(owner, state)

    try:
        evil.reset(flooding)
        dropped = site.stats["dropped_late_reply"]
        got = attack("bytes", site, tmp_path)
        assert got == DATA
        assert sent >= 100
        wait_for(lambda: site.stats["dropped_late_reply"] - dropped >= sent, timeout=5.0)
    finally:
        mallory.stop()


def test_service_unavailable_forever_ends_within_the_tries(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(lambda o, s: make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy"))
    start = time.monotonic()
    with pytest.raises(DownloadError, match="service_unavailable") as info:
        attack("file", site, tmp_path, tries=3)
    assert "after 3 tries" in info.value.reason
    assert len(evil.requests) == 3
    assert time.monotonic() - start < 5.0
    assert list(tmp_path.iterdir()) == []


def test_service_unavailable_for_every_chunk_ends_within_the_tries(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    _, site, evil = net

    def busy_after_first(owner: HostileOwner, state: Any) -> Body:
        if is_first(state):
            return honest(owner, state)
        return make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy")

    evil.reset(busy_after_first)
    with pytest.raises(DownloadError, match=r"after 3 tries.*service_unavailable"):
        attack("file", site, tmp_path, tries=3)
    assert len(evil.requests) <= 1 + SITE_KW["window"] * 3
    assert list(tmp_path.iterdir()) == []


def test_busy_once_per_chunk_after_progress_costs_no_try(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """An honest owner at its cap with a window of one: the chunk it just served is still
    on its way out when the next request comes, so that request is answered busy. Each
    busy answer after a stored chunk is retried without spending a try."""
    _, site, evil = net
    asked: set[int] = set()

    def busy_at_first_ask(owner: HostileOwner, state: Any) -> Body:
        offset = (state or {}).get("offset")
        if offset is not None and offset < len(owner.data) and offset not in asked:
            asked.add(offset)
            return make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy: the last chunk is leaving")
        return honest(owner, state)

    evil.reset(busy_at_first_ask)
    assert attack("bytes", site, tmp_path, tries=1, window=1) == DATA
    assert len(asked) >= 2  # several chunks, each answered busy once


def test_service_unavailable_forever_ends_at_the_overall_timeout(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    _, site, evil = net
    evil.reset(lambda o, s: make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy"))
    start = time.monotonic()
    with pytest.raises(DownloadError, match="overall timeout"):
        attack("bytes", site, tmp_path, tries=10**6, backoff_max=0.05, overall_timeout=1.0)
    assert time.monotonic() - start < 4.0


def test_junk_after_the_last_byte_does_not_undo_a_verified_download(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """Once every byte is here and hashed, the owner's answer to "done" cannot fail it."""
    _, site, evil = net

    def junk_at_the_end(owner: HostileOwner, state: Any) -> Body:
        if state and state.get("offset") == len(owner.data):
            return {"status": 5, "data": {"x": 1}}
        return honest(owner, state)

    evil.reset(junk_at_the_end)
    assert attack("file", site, tmp_path) == tmp_path / "dest.bin"
    assert (tmp_path / "dest.bin").read_bytes() == DATA


def test_a_failed_download_hashed_on_its_own_thread_ends_that_thread(
    net: tuple[Broker, Cell, HostileOwner], tmp_path: Path
) -> None:
    """sha256 over more than a window is hashed on a thread; junk later must stop it."""
    _, site, evil = net
    data = os.urandom(64 * CHUNK)
    seen: list[bool] = []

    def digest_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "objdl-digest"]

    def sha_then_junk(owner: HostileOwner, state: Any) -> Body:
        body = honest(owner, state)
        if is_first(state):
            body["state"] = {**body["state"], "algo": "sha256"}
            body["state"]["digest"] = reference_digest("sha256", owner.data)
        elif state["offset"] == 20 * CHUNK:
            seen.append(bool(digest_threads()))  # (the site is in this process)
            body = {**body, "data": 7}
        return body

    evil.reset(sha_then_junk, data)
    with pytest.raises(DownloadError, match="chunk data must be bytes"):
        attack("bytes", site, tmp_path)
    assert seen == [True]  # the hashing thread was there...
    wait_for(lambda: not digest_threads())  # ...and ended with the download


# --- the checks themselves, on any input -----------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=40),
    st.binary(max_size=40),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=20,
)
near_descriptions = st.fixed_dictionaries(
    {},
    optional={
        "offset": st.integers(-2, 2) | values,
        "size": st.integers(-(2**65), 2**65) | values,
        "chunk": st.integers(-2, MAX_CHUNK_SIZE + 2) | values,
        "algo": st.sampled_from([*DIGESTS, "md5"]) | values,
        "digest": st.text("0123456789abcdefABCDEFz", max_size=130) | values,
        "meta": values,
    },
)


@settings(max_examples=500, deadline=None)
@given(state=values | near_descriptions)
def test_parse_descriptor_returns_checked_types_or_bad_reply(state: Any) -> None:
    try:
        desc = parse_descriptor(state)
    except BadReply:
        return
    assert type(desc.size) is int and 0 <= desc.size < 2**63
    assert type(desc.chunk) is int and 1 <= desc.chunk <= MAX_CHUNK_SIZE
    assert desc.algo in DIGESTS and isinstance(desc.digest, str)


@settings(max_examples=300, deadline=None)
@given(data=values, state=values, offset=st.integers(0, 2**40), n=st.integers(1, 2**20))
def test_chunk_checks_raise_only_bad_reply(data: Any, state: Any, offset: int, n: int) -> None:
    desc = Descriptor(2**41, 4096, "xxh3_128", "0" * 32, None)
    try:
        pieces = chunk_pieces(data)
        assert all(isinstance(p, memoryview) and p.format == "B" for p in pieces)
    except BadReply:
        pass
    with contextlib.suppress(BadReply):
        check_chunk_state(state, desc, offset, n)


@pytest.mark.parametrize("algo", DIGESTS)
def test_a_real_owners_description_passes(algo: str) -> None:
    desc = ObjectProducer(digest=algo).prepare("R1", b"some bytes")
    assert parse_descriptor(desc).as_state() == desc
