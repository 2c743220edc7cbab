"""sd_notify(3), sd_watchdog_enabled(3) and sd_listen_fds(3) with the standard library only.

Invariants:
- Without ``NOTIFY_SOCKET`` (not started by systemd ``Type=notify``) every call is a no-op.
- Sending never blocks and never raises: the socket is non-blocking, and a full queue or a vanished
  listener drops the message with a DEBUG line (systemd keeps the last STATUS= anyway, and a missed
  WATCHDOG=1 is followed by the next one).
- Only paths starting with ``/`` or ``@`` (abstract namespace) are accepted, as in systemd's own
  ``notify-selfcontained-example.py``.
- Sockets passed by socket activation are adopted only when ``LISTEN_PID`` names this process (a child that
  inherited the variables must not take its parent's sockets), and only listening stream sockets; the variables
  are then removed from the environment, as ``sd_listen_fds(1)`` does, and the descriptors marked close-on-exec.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    """Turn a NOTIFY_SOCKET value into a socket address, or None when it is not one we may use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Return WATCHDOG_USEC in seconds when the watchdog is meant for this process, else None."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 1_000_000


SD_LISTEN_FDS_START = 3  # the first descriptor systemd passes (sd_listen_fds(3))
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_sockets(
    environ: MutableMapping[str, str] | None = None, *, first_fd: int = SD_LISTEN_FDS_START
) -> list[socket.socket]:
    """Return the listening stream sockets systemd passed to this process (socket activation), else [].

    Reads ``LISTEN_PID``/``LISTEN_FDS`` from ``environ`` (default: the process environment) and removes them
    there once the sockets are adopted. A passed descriptor that is not a listening stream socket is left alone.
    ``first_fd`` is systemd's 3 (tests pass a descriptor of their own).
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    for name in _LISTEN_VARIABLES:
        env.pop(name, None)
    adopted = [_adopt(fd) for fd in range(first_fd, first_fd + int(count))]
    return [sock for sock in adopted if sock is not None]


def _adopt(fd: int) -> socket.socket | None:
    """Wrap a passed descriptor as a socket if it is a listening stream socket; log and skip it otherwise."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.warning("passed descriptor ignored fd=%d error=%s", fd, exc)
        return None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        log.warning("passed descriptor ignored fd=%d: not a listening stream socket", fd)
        sock.detach()  # the descriptor stays open and untouched: it is not ours to close
        return None
    os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC: a child we start must not inherit it
    return sock


def monotonic_usec() -> int:
    """Return CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _no_newlines(text: str) -> str:
    """Keep a STATUS= value on one line (a newline would start a new assignment)."""
    return " ".join(text.split())


class Notifier:
    """One datagram socket to systemd's notify socket, opened once."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        self._sock: socket.socket | None = None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET ignored value=%r: not an absolute path or @abstract name", raw)
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Tell whether a notify socket is configured."""
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; return whether it was handed to the kernel."""
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._sock.sendto(message, self._address)
        except BlockingIOError:
            log.debug("sd_notify dropped (socket queue full) message=%s", assignments[0])
            return False
        except OSError as exc:
            log.debug("sd_notify failed error=%s message=%s", exc, assignments[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) is complete."""
        return self.send("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Tell systemd a reload began (with the MONOTONIC_USEC= that Type=notify-reload requires)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd shutdown began."""
        return self.send("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.send(f"STATUS={_no_newlines(text)}")

    def watchdog(self) -> bool:
        """Ping the service watchdog."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls become no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        """Return the STATUS= assignment for ``text``, if any."""
        return () if text is None else (f"STATUS={_no_newlines(text)}",)
