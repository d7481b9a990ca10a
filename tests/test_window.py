"""The site's DownloadWindow, driven with a fake clock: no sockets, no threads, no sleeps.

`Site` below does what a driver does with each step (keeps what is sent, stores and
hashes what is written, reports the hashing, hands over the digest); the owner's
replies are made by hand, honest or not, and delivered in whatever order a test likes.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objdl.downloader._defs import RetryPolicy
from objdl.downloader._window import (
    BUSY_DELAY,
    ChunkRequest,
    DownloadWindow,
    Step,
    WindowStateError,
    Write,
)
from objdl.downloader.sized import OrderedDigest
from objdl.message import Message, ReturnCode, make_reply
from tests.conftest import reference_digest

C = 100  # the chunk size of these tests
OWNER = "server"
DATA = os.urandom(10 * C + 37)
PROPERTY = settings(max_examples=150, deadline=None)


def window(**kw: Any) -> DownloadWindow:
    args: dict[str, Any] = {
        "ref_id": "R1",
        "owner": OWNER,
        "chunk": C,
        "window": 4,
        "retry": RetryPolicy(3, 0.5, 4.0),
        "timeout": 5.0,
        "deadline": None,
        "started": 0.0,
    }
    args.update(kw)
    return DownloadWindow(**args)


def describe(data: bytes, chunk: int = C, algo: str = "xxh3_128") -> dict[str, Any]:
    return {
        "offset": 0,
        "size": len(data),
        "chunk": chunk,
        "algo": algo,
        "digest": reference_digest(algo, data),
        "meta": None,
    }


def ok(body: Any) -> Message:
    return make_reply(ReturnCode.OK, body=body)


def answer(req: ChunkRequest, data: bytes, chunk: int = C) -> Message:
    """What an honest owner serving `data` in chunks of `chunk` answers to `req`."""
    state = req.state
    if req.kind == "first":
        n = min(state["length"], chunk, len(data))
        return ok({"status": "ok", "state": describe(data, chunk), "data": data[:n]})
    if req.kind == "chunk":
        o = state["offset"]
        n = min(state["length"], chunk, len(data) - o)
        return ok({"status": "ok", "state": {"offset": o + n}, "data": data[o : o + n]})
    if state["ok"]:
        return ok({"status": "eof"})
    return ok({"status": "error", "error": state["reason"]})


class Site:
    """Does what the window's steps say, the way the driver does, minus the I/O."""

    def __init__(
        self, win: DownloadWindow, data: bytes = DATA, resume: int = 0, lazy: bool = False
    ) -> None:
        self.win, self.data, self.resume = win, data, resume
        self.lazy = lazy  # queue the writes until flush(): a writer that falls behind
        self.queued: list[Write] = []
        self.now = 0.0
        self.out: dict[int, ChunkRequest] = {}  # sent and not answered or cancelled
        self.sent: list[ChunkRequest] = []
        self.buf = bytearray()
        self.digest: OrderedDigest | None = None
        self.hashed = 0
        self.end: Step | None = None
        self.peak_held = 0  # most bytes asked for and not yet hashed

    def do(self, step: Step) -> Step:
        for key in step.cancel:
            self.out.pop(key, None)
        for r in step.send:
            assert r.key not in self.out
            self.out[r.key] = r
            self.sent.append(r)
            assert len(self.out) <= self.win.window
            if r.kind == "chunk":
                self.peak_held = max(self.peak_held, r.offset + r.length - self.hashed)
        self.queued += step.write
        if not self.lazy or step.verify:
            self.store(len(self.queued))
        if step.ended:
            assert self.end is None, "a window ends once"
            self.end = step
            return step
        if step.described is not None:
            self.buf = bytearray(step.described.size)
            self.buf[: self.resume] = self.data[: self.resume]
            self.digest = OrderedDigest(step.described.algo)
            self.digest.add(0, [memoryview(self.data[: self.resume])])
            self.hashed = self.resume
            self.do(self.win.begin(self.resume, self.now))
        self.report()
        if step.verify:
            assert self.digest is not None
            self.do(self.win.on_digest(self.digest.hexdigest(), self.now))
        return step

    def store(self, n: int) -> None:
        """Write and hash the `n` oldest queued writes."""
        for w in self.queued[:n]:
            assert self.digest is not None
            self.buf[w.offset : w.offset + w.nbytes] = b"".join(bytes(p) for p in w.pieces)
            self.digest.add(w.offset, w.pieces)
        del self.queued[:n]

    def report(self) -> None:
        if self.digest is not None and self.digest.hashed != self.hashed and not self.end:
            self.hashed = self.digest.hashed
            self.do(self.win.on_hashed(self.hashed, self.now))

    def flush(self, n: int) -> None:
        self.store(n)
        self.report()

    def start(self) -> Step:
        return self.do(self.win.start(self.now))

    def reply(self, key: int | None = None, msg: Message | None = None) -> Step:
        """Answer request `key` (default: the oldest still out) with `msg` (default: honest)."""
        if key is None:
            key = min(self.out)
        req = self.out.pop(key)
        return self.do(
            self.win.on_reply(key, answer(req, self.data) if msg is None else msg, self.now)
        )

    def tick(self, now: float) -> Step:
        self.now = now
        return self.do(self.win.on_tick(now))

    def chunks_out(self) -> list[int]:
        return sorted(r.offset for r in self.out.values() if r.kind == "chunk")

    def run(self, rng: random.Random | None = None) -> Step:
        """Answer honestly until the end, in random order if `rng` is given."""
        while self.end is None:
            assert self.out, "the window waits for nothing"
            keys = sorted(self.out)
            self.reply(rng.choice(keys) if rng else keys[0])
        return self.end


def described_site(**kw: Any) -> Site:
    """A site whose first request was answered (and whose first chunk is stored)."""
    data = kw.pop("data", DATA)
    resume = kw.pop("resume", 0)
    site = Site(window(**kw), data, resume)
    site.start()
    site.reply()
    return site


# --- the honest path -------------------------------------------------------------------


def test_start_asks_for_the_description_with_our_chunk() -> None:
    win = window()
    step = win.start(10.0)
    (r,) = step.send
    assert (r.kind, r.offset, r.state, r.attempt) == ("first", None, {"length": C}, 1)
    assert (r.timeout, r.deadline) == (5.0, 15.0)
    assert not step.write and not step.ended and win.in_flight == 1


def test_first_reply_describes_then_begin_stores_the_first_chunk_and_fills_the_window() -> None:
    win = window()
    (first,) = win.start(0.0).send
    step = win.on_reply(first.key, answer(first, DATA), 0.1)
    assert step.described is not None and step.described.size == len(DATA)
    assert not step.send and not step.write  # nothing before the consumer is ready
    step = win.begin(0, 0.2)
    (w,) = step.write
    assert (w.offset, w.nbytes, b"".join(w.pieces)) == (0, C, DATA[:C])
    # Not hashed yet: the span (4 chunks past byte 0) allows 3 more chunks.
    assert [(r.offset, r.length) for r in step.send] == [(C, C), (2 * C, C), (3 * C, C)]
    step = win.on_hashed(C, 0.3)
    assert [r.offset for r in step.send] == [4 * C]
    assert win.in_flight == 4


def test_a_whole_download_in_order_then_the_final_request() -> None:
    site = Site(window())
    site.start()
    while site.end is None:
        keys = sorted(site.out)
        if site.out[keys[0]].kind == "final":
            final = site.out[keys[0]]
            assert final.state == {"offset": len(DATA), "ok": True, "reason": ""}
        site.reply(keys[0])
    assert site.end.done and site.end.failed is None and not site.end.note
    assert bytes(site.buf) == DATA
    assert site.win.state == "done" and site.win.in_flight == 0


def test_the_owners_smaller_chunk_is_used() -> None:
    win = window(chunk=4 * C)
    (first,) = win.start(0.0).send
    assert first.state == {"length": 4 * C}
    win.on_reply(first.key, answer(first, DATA, chunk=C), 0.0)
    step = win.begin(0, 0.0)
    assert step.write[0].nbytes == C and all(r.length == C for r in step.send)


@pytest.mark.parametrize("seed", range(5))
def test_replies_in_any_order_land_where_they_belong(seed: int) -> None:
    site = Site(window(window=5))
    site.start()
    assert site.run(random.Random(seed)).done
    assert bytes(site.buf) == DATA


def test_an_empty_object_verifies_at_once() -> None:
    site = Site(window(), data=b"")
    site.start()
    step = site.reply()
    assert not step.send or [r.kind for r in step.send] == []
    assert [r.kind for r in site.out.values()] == ["final"]
    assert site.run().done


def test_resume_asks_only_for_the_rest_and_drops_the_first_chunk() -> None:
    site = described_site(resume=3 * C + 5)
    first_writes = [r.offset for r in site.sent if r.kind == "chunk"]
    assert first_writes[0] == 3 * C + 5  # and nothing before it
    assert site.run().done
    assert bytes(site.buf) == DATA


def test_resume_of_everything_goes_straight_to_the_digest() -> None:
    site = described_site(resume=len(DATA))
    assert [r.kind for r in site.out.values()] == ["final"]
    assert site.run().done


@pytest.mark.parametrize("start", [-1, len(DATA) + 1, True, 1.5, "3", None])
def test_a_resume_point_outside_the_object_fails(start: Any) -> None:
    win = window()
    (first,) = win.start(0.0).send
    win.on_reply(first.key, answer(first, DATA), 0.0)
    step = win.begin(start, 0.0)
    assert step.failed is not None and "resume point" in step.failed.reason
    assert "could not start the download" in step.failed.reason
    assert not step.send and not step.write


# --- retries, timeouts, deadlines --------------------------------------------------------


def test_a_timed_out_request_is_retried_after_the_backoff_until_the_tries_run_out() -> None:
    site = described_site(window=1)
    (key,) = site.out
    assert site.tick(4.99).cancel == []
    step = site.tick(5.0)
    assert step.cancel == [key] and not step.send  # retried after 0.5 s, not at once
    assert site.win.next_wake() == 5.5
    assert not site.tick(5.49).send
    (again,) = site.tick(5.5).send
    assert (again.offset, again.attempt, again.deadline) == (C, 2, 10.5) and again.key != key
    site.tick(10.5)
    assert site.win.next_wake() == 11.5  # the backoff doubles
    (third,) = site.tick(11.5).send
    assert third.attempt == 3
    step = site.tick(16.5)
    assert step.failed is not None and step.failed.code == ReturnCode.TIMEOUT
    assert step.failed.reason == (
        "error requesting data from server after 3 tries (16.50s): timeout: "
        "no reply from server in time"
    )
    assert site.win.retries == 2


def test_a_late_reply_to_a_timed_out_request_is_dropped() -> None:
    site = described_site(window=1)
    (key,) = site.out
    req = site.out[key]
    site.tick(5.0)
    late = site.win.on_reply(key, answer(req, DATA), 5.1)
    assert late == Step()  # no write, no send: the retry owns that chunk now
    (again,) = site.tick(5.5).send
    site.reply(again.key)
    assert site.run().done and bytes(site.buf) == DATA


@pytest.mark.parametrize(
    "code", [ReturnCode.TARGET_UNREACHABLE, ReturnCode.COMM_ERROR, ReturnCode.TIMEOUT]
)
def test_retryable_codes_spend_tries(code: str) -> None:
    site = described_site(window=1, retry=RetryPolicy(2, 0.0, 0.0))
    step = site.reply(msg=make_reply(code, "gone"))
    (again,) = step.send  # backoff 0: at once
    assert again.attempt == 2
    step = site.reply(msg=make_reply(code, "gone"))
    assert step.failed is not None and "after 2 tries" in step.failed.reason
    assert step.failed.code == code


def test_any_other_code_fails_at_once_with_the_owners_text_escaped() -> None:
    site = described_site()
    key = min(site.out)
    others = set(site.out) - {key}
    msg = make_reply(ReturnCode.INVALID_REQUEST, "no\x1b[2J such " + "x" * 900)
    step = site.reply(key, msg)
    assert step.failed is not None and step.failed.code == ReturnCode.INVALID_REQUEST
    assert step.failed.reason.startswith("error requesting data from server (0.00s): ")
    assert step.failed.reason.isprintable() and len(step.failed.reason) < 700
    assert set(step.cancel) == others and len(others) == 3  # nothing left waiting


def test_the_overall_deadline_is_checked_before_a_retry() -> None:
    site = described_site(window=1, deadline=3.0)
    site.now = 3.0
    step = site.reply(msg=make_reply(ReturnCode.TIMEOUT, "slow"))
    assert step.failed is not None
    assert step.failed.reason == "overall timeout: download not finished after 3.00s"


def test_the_overall_deadline_ends_a_stalled_download_on_a_tick() -> None:
    site = described_site(deadline=3.0)
    out = set(site.out)
    assert site.win.next_wake() == 3.0  # before any request's own deadline
    step = site.tick(3.0)
    assert step.failed is not None and "overall timeout" in step.failed.reason
    assert set(step.cancel) == out and len(out) == 4


def test_request_timeouts_are_cut_to_the_overall_deadline() -> None:
    win = window(deadline=2.0)
    (first,) = win.start(0.5).send
    assert (first.timeout, first.deadline) == (1.5, 2.0)


def test_a_download_whose_bytes_all_arrived_is_not_failed_by_the_deadline() -> None:
    site = described_site(data=DATA[: 2 * C], window=2, deadline=3.0)
    site.now = 3.5  # the last chunk arrives after the deadline
    site.reply()
    assert site.end is not None and site.end.done  # every byte is here and verified
    assert "overall timeout" in site.end.note  # (too late to tell the owner)
    assert not any(r.kind == "final" for r in site.sent)
    assert bytes(site.buf) == site.data


def test_the_final_request_waits_no_longer_than_the_deadline() -> None:
    site = described_site(data=DATA[: 2 * C], window=2, deadline=3.0)
    site.now = 2.9
    site.reply()
    (final,) = site.out.values()
    assert final.kind == "final" and final.deadline == 3.0
    assert final.timeout == pytest.approx(0.1)


# --- busy owners -----------------------------------------------------------------------


def busy() -> Message:
    return make_reply(ReturnCode.SERVICE_UNAVAILABLE, "busy")


def test_busy_while_others_are_in_flight_shrinks_the_window_and_costs_no_try() -> None:
    site = described_site(retry=RetryPolicy(1, 0.0, 0.0))  # a spent try would fail it
    assert len(site.out) == 4
    site.reply(msg=busy())  # (free anyway: a chunk was stored before it)
    step = site.reply(msg=busy())  # nothing stored since, but two still in flight: free
    assert not step.failed and not step.send and site.win.limit == 2
    assert not site.tick(BUSY_DELAY).send  # due, but no room: two are in flight
    step = site.reply()  # a slot frees: the oldest retry goes, same try
    (again,) = step.send
    assert again.attempt == 1 and again.offset == C
    # The limit grows back by one per `limit` chunks stored.
    site.reply()
    assert site.win.limit == 3
    assert site.run().done and bytes(site.buf) == DATA


def test_the_first_busy_answer_after_a_stored_chunk_is_free_the_next_is_not() -> None:
    site = described_site(window=1, retry=RetryPolicy(2, 0.0, 0.0))
    step = site.reply(msg=busy())  # the first chunk was stored: free
    assert not step.send and not step.failed
    (again,) = site.tick(BUSY_DELAY).send
    assert again.attempt == 1
    (retry,) = site.reply(msg=busy()).send  # nothing stored since: a try spent
    assert retry.attempt == 2
    step = site.reply(msg=busy())
    assert step.failed is not None
    assert "after 2 tries" in step.failed.reason and "service_unavailable" in step.failed.reason


def test_busy_for_the_first_request_spends_tries() -> None:
    win = window(retry=RetryPolicy(2, 0.0, 0.0))
    (first,) = win.start(0.0).send
    (again,) = win.on_reply(first.key, busy(), 0.0).send
    assert again.attempt == 2
    step = win.on_reply(again.key, busy(), 0.0)
    assert step.failed is not None and "after 2 tries" in step.failed.reason


def test_a_retry_waits_for_room_without_making_the_driver_spin() -> None:
    site = described_site(window=2)
    assert len(site.out) == 2
    site.reply(msg=busy())  # limit 1, one in flight, a retry due at 0.05
    assert site.win.limit == 1 and len(site.out) == 1
    (deadline,) = [r.deadline for r in site.out.values()]
    assert site.win.next_wake() == deadline  # not the retry's time: there is no room
    assert not site.tick(1.0).send


# --- what the owner may not do ---------------------------------------------------------


def chunk_body(offset: int, data: bytes, **state: Any) -> Message:
    return ok({"status": "ok", "state": {"offset": offset + len(data), **state}, "data": data})


def test_an_answer_for_an_offset_never_asked_fails() -> None:
    site = described_site()
    key = min(site.out)
    step = site.reply(key, chunk_body(7 * C, DATA[7 * C : 8 * C]))
    assert step.failed is not None and "an answer to another request" in step.failed.reason
    assert not step.write


@pytest.mark.parametrize("n", [0, C - 1, C + 1, 50 * C])
def test_a_chunk_of_the_wrong_length_fails(n: int) -> None:
    site = described_site()
    key = min(site.out)
    offset = site.out[key].offset
    body = ok({"status": "ok", "state": {"offset": offset + C}, "data": b"x" * n})
    step = site.reply(key, body)
    assert step.failed is not None
    assert step.failed.reason == f"owner sent {n} bytes at offset {offset}, expected {C}"
    assert not step.write


def test_a_duplicate_reply_is_dropped() -> None:
    site = described_site()
    key = min(site.out)
    req = site.out[key]
    first = site.reply(key)
    assert len(first.write) == 1
    assert site.win.on_reply(key, answer(req, DATA), 0.0) == Step()


@pytest.mark.parametrize("key", [0, -1, 10**9, 2**70])
def test_a_reply_to_a_request_never_sent_is_dropped(key: int) -> None:
    site = described_site()
    assert site.win.on_reply(key, chunk_body(C, DATA[C : 2 * C]), 0.0) == Step()
    assert site.run().done


def test_replies_after_the_end_are_dropped() -> None:
    site = Site(window())
    site.start()
    keys_seen = []
    while site.end is None:
        key = min(site.out)
        keys_seen.append((key, site.out[key]))
        site.reply(key)
    for key, req in keys_seen:
        assert site.win.on_reply(key, answer(req, DATA), 9.0) == Step()
    assert site.win.on_tick(99.0) == Step() and site.win.on_hashed(0, 99.0) == Step()
    assert site.win.state == "done"


def test_replies_after_a_failure_are_dropped() -> None:
    site = described_site()
    out = dict(site.out)
    site.do(site.win.abort(1.0))
    assert site.end is not None and site.end.failed is not None
    assert set(site.end.cancel) == set(out)
    for key, req in out.items():
        assert site.win.on_reply(key, answer(req, DATA), 1.0) == Step()


def test_a_huge_declared_size_asks_for_no_more_than_the_window() -> None:
    win = window(window=4)
    (first,) = win.start(0.0).send
    desc = {**describe(DATA), "size": 2**62}
    win.on_reply(first.key, ok({"status": "ok", "state": desc, "data": DATA[:C]}), 0.0)
    step = win.begin(0, 0.0)
    assert len(step.send) == 3 and win.in_flight == 3  # the object's size changes nothing
    # Chunks that arrive but are never hashed (a stalled writer) stop the asking.
    asked = list(step.send)
    for _ in range(10):
        if not asked:
            break
        r = asked.pop(0)
        o = r.offset
        assert o is not None
        asked += win.on_reply(r.key, chunk_body(o, b"\0" * C), 0.0).send
    assert win.next <= 4 * C


def test_max_size_refuses_the_description_and_tells_the_owner() -> None:
    win = window(max_size=len(DATA) - 1)
    (first,) = win.start(0.0).send
    step = win.on_reply(first.key, answer(first, DATA), 0.0)
    assert step.failed is not None and step.failed.cancel_owner and not step.send
    assert f"more than max_size={len(DATA) - 1}" in step.failed.reason


@pytest.mark.parametrize(
    ("twist", "fragment"),
    [
        ({"size": -1}, "size must be an int"),
        ({"chunk": 0}, "chunk must be an int"),
        ({"algo": "md5"}, "algo must be one of"),
        ({"digest": "z" * 32}, "lowercase hex"),
        ({"offset": 5}, "offset must be 0"),
    ],
)
def test_a_bad_description_fails_and_tells_the_owner(twist: dict, fragment: str) -> None:
    win = window()
    (first,) = win.start(0.0).send
    body = {"status": "ok", "state": {**describe(DATA), **twist}, "data": DATA[:C]}
    step = win.on_reply(first.key, ok(body), 0.0)
    assert step.failed is not None and step.failed.cancel_owner
    assert (
        fragment in step.failed.reason and "did not describe a sized object" in step.failed.reason
    )


def test_the_description_may_not_change_mid_download() -> None:
    site = described_site()
    key = min(site.out)
    o = site.out[key].offset
    step = site.reply(key, chunk_body(o, DATA[o : o + C], size=len(DATA) + 1))
    assert step.failed is not None and "size changed mid-download" in step.failed.reason


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"status": "eof"}, "ended the object early"),
        ({"status": "error", "error": "disk on fire"}, "producer error at server"),
        ({"status": 3}, "status that is not a str"),
        ({"status": "okay"}, "unknown status"),
        ([1, 2], "without a payload dict"),
        ({"status": "ok", "state": None, "data": b"x"}, "not a dict"),
        ({"status": "ok", "state": {"offset": 2 * C}, "data": 7}, "chunk data must be bytes"),
    ],
)
def test_bad_chunk_replies_fail(body: Any, fragment: str) -> None:
    site = described_site()
    step = site.reply(msg=ok(body))
    assert step.failed is not None and fragment in step.failed.reason, step.failed


def test_bytes_of_another_chunk_fail_the_digest_and_are_rejected() -> None:
    site = described_site(window=1)
    key = min(site.out)
    o = site.out[key].offset
    site.reply(key, chunk_body(o, DATA[:C]))  # the right state, the wrong bytes
    end = site.run()
    assert end.failed is not None and end.failed.reject
    assert end.failed.reason.startswith("digest mismatch: owner's xxh3_128 is ")
    (final,) = [r for r in site.sent if r.kind == "final"]
    assert final.state["ok"] is False and final.state["reason"] == end.failed.reason


def test_junk_for_the_final_request_leaves_a_verified_download_done() -> None:
    site = Site(window())
    site.start()
    while site.end is None:
        key = min(site.out)
        if site.out[key].kind == "final":
            site.reply(key, ok({"status": 5, "data": {"x": 1}}))
        else:
            site.reply(key)
    assert site.end.done and "status that is not a str" in site.end.note


def test_a_final_request_that_times_out_leaves_a_note() -> None:
    site = Site(window(retry=RetryPolicy(1, 0.0, 0.0)))
    site.start()
    while not any(r.kind == "final" for r in site.out.values()):
        site.reply()
    step = site.tick(100.0)
    assert step.done and "timeout" in step.note


# --- the driver's own failures, and abort --------------------------------------------------


def test_fail_ends_the_download_and_cancels_what_is_in_flight() -> None:
    site = described_site()
    out = set(site.out)
    step = site.win.fail("could not write at offset 100: OSError: disk full", 1.0)
    assert step.failed is not None and step.failed.reason.startswith("could not write")
    assert set(step.cancel) == out and site.win.in_flight == 0
    assert site.win.fail("again", 2.0) == Step()  # (one end only)


def test_abort_says_how_long_it_ran() -> None:
    site = described_site()
    step = site.win.abort(2.5)
    assert step.failed is not None and step.failed.reason == "download aborted after 2.50s"
    assert step.failed.code is None and not step.failed.cancel_owner


def test_a_failure_while_confirming_is_only_a_note() -> None:
    site = Site(window())
    site.start()
    while not any(r.kind == "final" for r in site.out.values()):
        site.reply()
    step = site.win.fail("comm_error: no broker connection", 1.0)
    assert step.done and step.note == "comm_error: no broker connection"


# --- illegal transitions ------------------------------------------------------------------


def test_illegal_transitions_raise() -> None:
    win = window()
    with pytest.raises(WindowStateError, match="begin"):
        win.begin(0, 0.0)
    with pytest.raises(WindowStateError, match="on_digest"):
        win.on_digest("00", 0.0)
    with pytest.raises(WindowStateError, match="on_hashed"):
        win.on_hashed(0, 0.0)
    (first,) = win.start(0.0).send
    with pytest.raises(WindowStateError, match="start"):
        win.start(0.0)
    win.on_reply(first.key, answer(first, DATA), 0.0)
    with pytest.raises(WindowStateError, match="on_hashed"):
        win.on_hashed(0, 0.0)
    win.begin(0, 0.0)
    with pytest.raises(WindowStateError, match="begin"):
        win.begin(0, 0.0)
    with pytest.raises(WindowStateError, match="hashed went"):
        win.on_hashed(2 * C, 0.0)  # more than has arrived
    win.on_hashed(C, 0.0)
    with pytest.raises(WindowStateError, match="hashed went"):
        win.on_hashed(C - 1, 0.0)  # backwards


@pytest.mark.parametrize("kw", [{"window": 0}, {"chunk": 0}, {"timeout": 0}, {"span": 2}])
def test_bad_settings_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError, match="need window"):
        window(**kw)


# --- the bounds, whatever happens --------------------------------------------------------


@PROPERTY
@given(
    size=st.integers(0, 30 * C),
    win_size=st.integers(1, 6),
    span_extra=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    resume=st.floats(0, 1),
)
def test_any_order_with_busy_answers_and_timeouts_gets_the_bytes_within_bounds(
    size: int, win_size: int, span_extra: int, seed: int, resume: float
) -> None:
    """Replies in random order, some answered busy, some never answered (timed out);
    writes reported hashed late: the bytes come out right, never more than `window`
    requests in flight, never more than `span` chunks asked for and not yet hashed."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    span = win_size + span_extra
    site = Site(
        window(window=win_size, span=span, retry=RetryPolicy(50, 0.01, 0.1)),
        data,
        resume=int(size * resume),
        lazy=True,
    )
    site.start()
    steps = 0
    while site.end is None:
        steps += 1
        assert steps < 20_000
        keys = sorted(site.out)
        roll = rng.random()
        if site.queued and (not keys or roll < 0.3):
            site.flush(rng.randint(1, len(site.queued)))
        elif not keys or roll < 0.35:
            site.tick(site.now + (5.0 if not keys or roll < 0.32 else 0.05))
        else:
            key = rng.choice(keys)
            if site.out[key].kind == "chunk" and roll < 0.45:
                site.reply(key, busy())
            else:
                site.reply(key)
        queued = sum(w.nbytes for w in site.queued)
        assert queued <= span * C  # what waits for the writer
    assert site.end.done, site.end
    assert bytes(site.buf) == data
    assert site.peak_held <= span * C


def test_span_bounds_what_waits_for_the_writer_and_window_what_is_asked() -> None:
    """With a span of two windows and a writer that never reports hashing, the site
    asks for at most window chunks beyond what arrived and span chunks in all."""
    win = window(window=3, span=6)
    (first,) = win.start(0.0).send
    win.on_reply(first.key, answer(first, DATA), 0.0)
    out = list(win.begin(0, 0.0).send)
    arrived = 1
    while out:
        r = out.pop(0)
        assert r.offset is not None and r.offset < 6 * C  # the span
        assert r.offset < arrived * C + 3 * C  # a window past what arrived
        out += win.on_reply(r.key, answer(r, DATA), 0.0).send
        arrived += 1
    assert win.next == 6 * C and win.in_flight == 0
    assert win.next_wake() is None  # nothing to time: waits for the writer
    assert len(win.on_hashed(3 * C, 0.0).send) == 3


def test_an_owner_busy_for_every_chunk_gets_no_more_than_a_window_of_asks() -> None:
    """Busy answers free slots without any data arriving; with a span of two windows
    the site still asks for no more than a window of distinct chunks past what it has."""
    site = described_site(window=3, span=6, retry=RetryPolicy(4, 0.01, 0.01))
    while site.end is None:
        if site.out:
            site.reply(msg=busy())  # (retries wait: a free slot may take a new chunk)
        else:
            wake = site.win.next_wake()
            assert wake is not None
            site.tick(wake)
    assert site.end.failed is not None and "service_unavailable" in site.end.failed.reason
    asked = {r.offset for r in site.sent if r.kind == "chunk"}
    assert asked == {C, 2 * C, 3 * C}


# --- a direct link being made ------------------------------------------------------------


def test_a_hold_asks_for_nothing_until_released_then_fills_the_window() -> None:
    win = window()
    (first,) = win.start(0.0).send
    win.hold(0.5)  # the first reply offered a link: wait for it
    step = win.on_reply(first.key, answer(first, DATA), 0.01)
    assert step.described is not None
    step = win.begin(0, 0.01)
    assert step.send == [] and win.in_flight == 0
    assert win.next_wake() == 0.5  # the driver wakes at the end of the hold at the latest
    step = win.release(0.02)  # the link is up (the first chunk is not hashed yet: 3 more)
    assert [r.offset for r in step.send] == [C, 2 * C, 3 * C]
    assert win.release(0.03).send == []  # once


def test_a_hold_ends_by_itself_on_a_tick() -> None:
    site = Site(window())
    site.start()
    site.win.hold(0.5)
    site.reply()
    assert site.chunks_out() == []
    site.tick(0.49)
    assert site.chunks_out() == []
    site.tick(0.5)
    assert site.chunks_out() == [C, 2 * C, 3 * C, 4 * C]
    assert site.run().done


def test_a_request_lost_with_its_link_is_asked_again_at_once_without_a_try() -> None:
    site = described_site()
    key = min(site.out)
    req = site.out.pop(key)
    step = site.do(site.win.on_rerouted(key, site.now))
    (again,) = step.send
    assert (again.offset, again.attempt) == (req.offset, req.attempt)
    assert site.win.retries == 0
    assert site.run().done
