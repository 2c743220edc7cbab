"""sd_notify without libsystemd: addresses, no-op without NOTIFY_SOCKET, never blocking, watchdog settings."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from klaviyo_bridge.systemd import Notifier, listen_sockets, monotonic_usec, watchdog_interval


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


# --------------------------------------------------------------------------------------- socket activation


def activation_env(pid: int | None = None, fds: int = 1) -> dict[str, str]:
    """Return what systemd sets for socket activation."""
    return {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(fds),
            "LISTEN_FDNAMES": "klaviyo-bridge.socket", "OTHER": "kept"}


def test_a_passed_listening_socket_is_adopted_and_the_variables_removed() -> None:
    """1. A listening TCP socket, its descriptor duplicated as systemd would pass it. 2. Adopt it.
    Result: one socket on that descriptor, serving connections; LISTEN_* removed, other variables kept; the
    descriptor is close-on-exec (a child must not inherit it)."""
    with socket.create_server(("127.0.0.1", 0)) as original:
        fd = os.dup(original.fileno())
        env = activation_env()
        [sock] = listen_sockets(env, first_fd=fd)
        with sock:
            assert sock.fileno() == fd
            assert not os.get_inheritable(fd)
            assert env == {"OTHER": "kept"}
            with socket.create_connection(sock.getsockname(), timeout=2):
                conn, _ = sock.accept()
                conn.close()


@pytest.mark.parametrize("env", [{}, activation_env(pid=1), {"LISTEN_PID": "x", "LISTEN_FDS": "1"}])
def test_sockets_meant_for_another_process_are_left_alone(env: dict[str, str]) -> None:
    """Result: without LISTEN_PID naming this process nothing is adopted and the environment is untouched."""
    before = dict(env)
    assert listen_sockets(env, first_fd=1_000_000) == []
    assert env == before


def test_a_passed_descriptor_that_is_no_listening_socket_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """1. Pass a UDP socket. Result: not adopted, one WARNING, and its descriptor still open (not ours)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with caplog.at_level(logging.WARNING):
            assert listen_sockets(activation_env(), first_fd=udp.fileno()) == []
        assert udp.fileno() >= 0
        os.fstat(udp.fileno())  # still open
    assert any("not a listening stream socket" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------- the shipped units

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "systemd" / "klaviyo-bridge.service"
SOCKET = REPO / "systemd" / "klaviyo-bridge.socket"
INSTALLED = "/opt/klaviyo-bridge/.venv/bin/klaviyo-bridge"


def unit_lines(path: Path) -> list[str]:
    """Return a unit's directive lines (no comments, no blanks)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_the_socket_listens_on_loopback_and_the_service_stays_unprivileged() -> None:
    """Result: the socket unit listens on 127.0.0.1:8787 (the README's [webhooks] listen) and carries no
    PrivateNetwork= (on a socket unit it would hide the socket); the service binds nothing privileged and keeps
    an empty capability set: it gets the socket from systemd or binds an unprivileged port itself."""
    socket_lines = unit_lines(SOCKET)
    assert "ListenStream=127.0.0.1:8787" in socket_lines
    assert not [line for line in socket_lines if line.startswith("PrivateNetwork=")]
    service = unit_lines(SERVICE)
    assert "CapabilityBoundingSet=" in service
    assert "AmbientCapabilities=" in service
    assert not [line for line in service if line.startswith(("Sockets=", "PrivateNetwork=", "User=root"))]
    assert '# listen = "127.0.0.1:8787"' in (REPO / "config.example.toml").read_text()


@pytest.fixture
def analyze() -> str:
    """Return systemd-analyze, or skip: CI (.ci/run) installs systemd and runs the same checks after the tests."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not installed (.ci/run installs it and checks the units)")
    return found


def test_both_units_verify_without_a_warning(analyze: str, tmp_path: Path) -> None:
    """1. The service with ExecStart pointing at this checkout's console script (verify wants it to exist), the
    socket beside it. Result: systemd-analyze verify prints nothing and exits 0."""
    script = Path(sys.executable).parent / "klaviyo-bridge"
    (tmp_path / SERVICE.name).write_text(SERVICE.read_text().replace(f"ExecStart={INSTALLED} ", f"ExecStart={script} "))
    (tmp_path / SOCKET.name).write_text(SOCKET.read_text())
    done = subprocess.run([analyze, "verify", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", [SERVICE, SOCKET], ids=lambda path: path.suffix.lstrip("."))
def test_each_unit_is_rated_2_0_or_better(analyze: str, unit: Path) -> None:
    """Result: systemd-analyze security --offline rates the service and the socket unit at exposure <= 2.0."""
    done = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)[1])  # type: ignore[index]
    assert exposure <= 2.0
