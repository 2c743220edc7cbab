"""sd_notify without libsystemd: addresses, no-op without NOTIFY_SOCKET, never blocking, watchdog settings."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from klaviyo_bridge.systemd import Notifier, monotonic_usec, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """Bind a datagram socket the way systemd's notify socket is bound; yield it and its NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "n.sock"
    if len(str(path)) < 100:
        sock.bind(str(path))
        address = str(path)
    else:  # sun_path is 108 bytes; a long tmp_path uses the abstract namespace instead
        name = f"kb-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    sock.settimeout(2)
    yield sock, address
    sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Result: disabled, every call returns False and raises nothing."""
    n = Notifier({})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()
    assert not n.stopping()
    n.close()


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    """1. READY with a status, 2. a status with a newline, 3. STOPPING, 4. WATCHDOG.
    Result: one datagram each, newline-separated assignments, STATUS kept on one line."""
    sock, address = listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.ready("running customers=2")
    assert n.status("line one\nline two")
    assert n.stopping()
    assert n.watchdog()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=running customers=2", "STATUS=line one line two", "STOPPING=1", "WATCHDOG=1"]
    n.close()
    assert not n.watchdog()


def test_abstract_namespace_address() -> None:
    """1. Bind an abstract socket. 2. NOTIFY_SOCKET=@name. Result: the datagram arrives."""
    name = f"kb-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
        n.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    """Result: RELOADING=1 with MONOTONIC_USEC from CLOCK_MONOTONIC (what Type=notify-reload requires)."""
    sock, address = listener
    before = monotonic_usec()
    n = Notifier({"NOTIFY_SOCKET": address})
    n.reloading("reloading config")
    n.close()
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    stamp = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= stamp <= monotonic_usec()
    assert abs(stamp - time.monotonic() * 1e6) < 1e6  # same clock as time.monotonic on Linux
    assert lines[2] == "STATUS=reloading config"


@pytest.mark.parametrize("value", ["relative/path", "@", "x"])
def test_unusable_addresses_are_ignored_with_a_warning(value: str, caplog: pytest.LogCaptureFixture) -> None:
    """Result: disabled, and one WARNING naming the variable."""
    with caplog.at_level(logging.WARNING):
        n = Notifier({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert any("NOTIFY_SOCKET ignored" in r.getMessage() for r in caplog.records)


def test_full_queue_drops_without_blocking(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """1. Nobody reads the socket. 2. Send until the kernel queue is full.
    Result: a send returns False at once (no block, no exception) and a DEBUG line says it was dropped."""
    _, address = listener
    n = Notifier({"NOTIFY_SOCKET": address})
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="klaviyo_bridge.systemd"):
        results = [n.status("x" * 1000) for _ in range(5000)]
    assert False in results
    assert time.monotonic() - started < 2
    assert any("sd_notify dropped" in r.getMessage() for r in caplog.records)
    n.close()


def test_vanished_listener_is_not_an_error(tmp_path: Path) -> None:
    """1. NOTIFY_SOCKET names a socket that no longer exists. Result: send returns False, nothing raised."""
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert not n.ready()
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Result: WATCHDOG_USEC in seconds, only when it is meant for this process."""
    assert watchdog_interval(env) == expected
