"""Run the real ``klaviyo-bridge run`` as systemd would: a subprocess with NOTIFY_SOCKET pointing at our socket.

Keys are ``file:`` references so a test can change one and reload (the process environment is fixed at start).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from kit.bridgekit import patch_example, toml_str

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"
CLIENT_ID = "bridge-client"
CLIENT_SECRET = "whiplash-secret-value-1"


@dataclass
class Shop:
    """One [[customers]] block; its key lives in a file the test can rewrite."""

    cid: int
    key: str
    launch: date
    enabled: bool = True


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; keeps every message in arrival order."""

    def __init__(self, tmp: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = tmp / "notify.sock"
        # sun_path holds 107 bytes; a long tmp_path falls back to the abstract namespace ("@name").
        if len(str(path)) < 100:
            self.sock.bind(str(path))
            self.address = str(path)
        else:
            name = f"klaviyo-bridge-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start collecting datagrams (once; later calls keep the running collector)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append(data.decode())

    def first(self, pred: Callable[[str], bool]) -> int:
        """Return the index of the first message matching ``pred`` (-1 if none)."""
        return next((i for i, m in enumerate(self.messages) if pred(m)), -1)

    def count(self, line: str) -> int:
        """Count messages containing the assignment ``line``."""
        return sum(line in m.splitlines() for m in self.messages)

    async def close(self) -> None:
        """Stop collecting and close the socket."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()


@dataclass
class Service:
    """A config, key files, the notify listener and the bridge process."""

    tmp: Path
    whiplash_url: str
    klaviyo_url: str
    shops: list[Shop]
    bridge: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None

    def __post_init__(self) -> None:
        self.notify = NotifyListener(self.tmp)
        self.log_path = self.tmp / "bridge.log"
        self.config_path = self.tmp / "config.toml"

    def key_file(self, cid: int) -> Path:
        """Return the file holding a customer's Klaviyo key."""
        return self.tmp / "keys" / f"klaviyo-{cid}"

    def config_text(self, shops: list[Shop] | None = None, extra: str = "") -> str:
        """Return a config for ``shops`` (default: ours), writing their key files."""
        values = {
            "bridge": {"state_path": toml_str(str(self.tmp / "state.db")), "poll_interval_seconds": "1.0",
                       **self.bridge},
            "whiplash": {"base_url": toml_str(self.whiplash_url), "client_id": toml_str(CLIENT_ID),
                         "client_secret": toml_str("env:WHIPLASH_SECRET"), "overlap_seconds": "60"},
            "klaviyo": {"base_url": toml_str(self.klaviyo_url), "key_probe_seconds": "1.0"},
        }
        text = patch_example(EXAMPLE.read_text(), values)
        for shop in self.shops if shops is None else shops:
            self.key_file(shop.cid).parent.mkdir(exist_ok=True)
            self.key_file(shop.cid).write_text(shop.key + "\n")
            text += (
                f"\n[[customers]]\nwhiplash_customer_id = {shop.cid}\nname = \"Shop {shop.cid}\"\n"
                f"klaviyo_api_key = {toml_str('file:' + str(self.key_file(shop.cid)))}\n"
                f"launch_date = {shop.launch.isoformat()}\nenabled = {'true' if shop.enabled else 'false'}\n"
            )
        return text + extra

    def write_config(self, shops: list[Shop] | None = None, extra: str = "") -> None:
        """Write the config file."""
        self.config_path.write_text(self.config_text(shops, extra))

    async def start(self, *, watchdog_usec: int | None = None, journal: bool = False, write: bool = True) -> None:
        """Start ``klaviyo-bridge run`` with NOTIFY_SOCKET (and WATCHDOG_USEC, JOURNAL_STREAM) set."""
        if write:
            self.write_config()
        self.notify.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_", "JOURNAL_", "NOTIFY_",
                                                                         "WATCHDOG_"))}
        env.update(WHIPLASH_SECRET=CLIENT_SECRET, PYTHONUNBUFFERED="1", NOTIFY_SOCKET=self.notify.address)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if journal:
            env["JOURNAL_STREAM"] = "8:12345"  # as systemd sets it when stderr goes to the journal
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "klaviyo_bridge", "run", "--config", str(self.config_path),
                env=env, cwd=str(self.tmp), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )

    @property
    def log(self) -> str:
        """Return everything the bridge logged so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        """Tell whether the bridge process is still alive."""
        return self.proc is not None and self.proc.returncode is None

    def send(self, sig: signal.Signals) -> None:
        """Send a signal to the bridge."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def until(self, what: str, pred: Callable[[], bool], limit_s: float = 6.0) -> None:
        """Wait until ``pred()`` holds, failing with the log when it does not within ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while not pred():
            assert self.proc is not None
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what} (rc={self.proc.returncode})\n{self.log}")
            await asyncio.sleep(0.05)

    async def until_notified(self, line: str, after: int = 0, limit_s: float = 6.0) -> int:
        """Wait for a message containing ``line`` (at index >= ``after``); return its index."""
        def found() -> bool:
            return any(line in m.splitlines() for m in self.notify.messages[after:])
        await self.until(f"notify {line}", found, limit_s)
        return after + next(i for i, m in enumerate(self.notify.messages[after:]) if line in m.splitlines())

    async def until_logged(self, text: str, limit_s: float = 6.0) -> None:
        """Wait until the log contains ``text``."""
        await self.until(f"log {text!r}", lambda: text in self.log, limit_s)

    async def wait_exit(self, limit_s: float) -> int:
        """Wait for the process to exit and return its status."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), limit_s)

    async def close(self) -> None:
        """Kill the process if it still runs and close the listener."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self.notify.close()
