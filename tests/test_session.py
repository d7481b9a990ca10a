"""The cell's broker session state machine, driven with a fake clock (no sockets)."""

from __future__ import annotations

import pytest

from objdl import wire
from objdl._session import Session, SessionState

REG = [wire.KIND_REG, wire.PROTOCOL_VERSION, b"site-1"]


def registered(now: float = 0.0) -> Session:
    s = Session("site-1", now, heartbeat_interval=0.5, broker_timeout=2.0)
    assert s.tick(now).send == [REG]
    act = s.on_frame(wire.KIND_REG_OK, [wire.KIND_REG_OK, b"site-1"], now)
    assert act.registered and s.registered
    return s


def test_registers_then_repeats_reg_until_answered() -> None:
    s = Session("site-1", 0.0, register_interval=0.1)
    assert s.tick(0.0).send == [REG]
    assert s.tick(0.05).send == []
    assert s.tick(0.1).send == [REG]
    assert s.state is SessionState.CONNECTING


def test_reg_ok_for_another_name_is_ignored() -> None:
    s = Session("site-1", 0.0)
    act = s.on_frame(wire.KIND_REG_OK, [wire.KIND_REG_OK, b"site-2"], 0.0)
    assert not act.registered and not s.registered


def test_heartbeats_while_registered() -> None:
    s = registered()
    assert s.tick(0.4).send == []
    assert s.tick(0.5).send == [[wire.KIND_HB]]
    assert s.tick(0.6).send == []


def test_silence_from_broker_reconnects_and_reports_loss() -> None:
    s = registered()
    s.heard(1.0)
    assert not s.tick(2.9).reconnect
    act = s.tick(3.1)
    assert act.reconnect and act.lost and not s.registered
    assert s.tick(3.1).send == [REG]  # registers again on the new socket


def test_ping_is_answered_with_heartbeat() -> None:
    s = registered()
    assert s.on_frame(wire.KIND_PING, [wire.KIND_PING], 0.1).send == [[wire.KIND_HB]]


def test_who_registers_again_on_same_socket() -> None:
    s = registered()
    act = s.on_frame(wire.KIND_WHO, [wire.KIND_WHO], 1.0)
    assert act.lost and not act.reconnect and act.send == [REG]
    assert s.state is SessionState.CONNECTING


def test_refusal_is_final() -> None:
    s = Session("site-1", 0.0)
    act = s.on_frame(wire.KIND_REG_ERR, [wire.KIND_REG_ERR, b"site-1", b"name taken"], 0.0)
    assert act.refused == "name taken" and s.state is SessionState.REFUSED
    assert s.tick(10.0).send == []


def test_close_says_bye_only_when_registered() -> None:
    assert registered().close() == [wire.KIND_BYE]
    assert Session("site-1", 0.0).close() is None


def test_bad_intervals_raise() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        Session("site-1", 0.0, heartbeat_interval=2.0, broker_timeout=1.0)


def test_next_deadline_covers_heartbeat_and_broker_timeout() -> None:
    s = registered()
    assert s.next_deadline() == pytest.approx(0.5)
    s.tick(0.5)
    assert s.next_deadline() == pytest.approx(1.0)
