"""Tests of objdl.message: headers, replies, new messages and Signal."""

from __future__ import annotations

import threading
import time

from objdl.message import (
    Message,
    MessageHeaderKey,
    MessageType,
    ReturnCode,
    Signal,
    make_reply,
    new_cell_message,
)


def test_message_defaults() -> None:
    message = Message()
    assert message.headers == {}
    assert message.payload is None
    assert Message().headers is not message.headers


def test_message_copies_headers() -> None:
    headers = {"a": 1}
    message = Message(headers, payload=[1])
    message.set_header("b", 2)
    headers["c"] = 3
    assert message.headers == {"a": 1, "b": 2}
    assert headers == {"a": 1, "c": 3}
    assert message.payload == [1]


def test_header_operations() -> None:
    message = Message({MessageHeaderKey.TOPIC: "t"})
    assert message.get_header(MessageHeaderKey.TOPIC) == "t"
    assert message.get_header("missing") is None
    assert message.get_header("missing", "dflt") == "dflt"
    message.set_header(MessageHeaderKey.TOPIC, "u")
    assert message.get_header(MessageHeaderKey.TOPIC) == "u"
    message.add_headers({"x": 1, MessageHeaderKey.TOPIC: "v"})
    assert message.headers == {MessageHeaderKey.TOPIC: "v", "x": 1}
    assert message.remove_header("x") == 1
    assert message.remove_header("x") is None
    assert message.headers == {MessageHeaderKey.TOPIC: "v"}


def test_repr_names_payload_type_only() -> None:
    text = repr(Message({"k": "v"}, b"secret bytes"))
    assert "'k': 'v'" in text
    assert "bytes" in text
    assert "secret" not in text


def test_make_reply() -> None:
    reply = make_reply(ReturnCode.OK, body={"d": 1})
    assert reply.headers == {MessageHeaderKey.RETURN_CODE: ReturnCode.OK}
    assert reply.payload == {"d": 1}
    failed = make_reply(ReturnCode.TIMEOUT, "took too long")
    assert failed.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.TIMEOUT
    assert failed.get_header(MessageHeaderKey.ERROR) == "took too long"
    assert failed.payload is None


def test_new_cell_message_copies_headers() -> None:
    headers = {MessageHeaderKey.MSG_TYPE: MessageType.REQUEST}
    payload = {"p": 1}
    message = new_cell_message(headers, payload)
    message.set_header("extra", 1)
    assert headers == {MessageHeaderKey.MSG_TYPE: MessageType.REQUEST}
    assert message.headers == {MessageHeaderKey.MSG_TYPE: "req", "extra": 1}
    assert message.payload is payload


def test_signal_trigger_value_reset() -> None:
    signal = Signal()
    assert not signal.triggered
    assert signal.value is None
    signal.trigger()
    assert signal.triggered
    assert signal.value is True
    signal.trigger("why")
    assert signal.value == "why"
    signal.reset()
    assert not signal.triggered
    assert signal.value is None
    signal.reset("kept")
    assert not signal.triggered
    assert signal.value == "kept"


def test_signal_wait_times_out() -> None:
    signal = Signal()
    start = time.monotonic()
    assert signal.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    assert signal.wait(0) is False


def test_signal_wait_when_already_triggered() -> None:
    signal = Signal()
    signal.trigger(7)
    assert signal.wait(0) is True
    assert signal.wait(5.0) is True


def test_signal_wait_is_ended_by_another_thread() -> None:
    signal = Signal()
    thread = threading.Timer(0.05, signal.trigger, args=("stop",))
    start = time.monotonic()
    thread.start()
    try:
        assert signal.wait(10.0) is True
        assert time.monotonic() - start < 5.0
        assert signal.value == "stop"
    finally:
        thread.cancel()
        thread.join(5.0)
    assert not thread.is_alive()
