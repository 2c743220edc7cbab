"""Socket activation as systemd does it: the real daemon gets a listening socket as fd 3 with LISTEN_PID/LISTEN_FDS.

The test holds the listening socket (as systemd's klaviyo-bridge.socket does) and starts the daemon through a
launcher that does what systemd does between fork and exec: the socket onto descriptor 3, LISTEN_PID set to its
own pid (``exec`` keeps it, so LISTEN_PID names the daemon itself) and LISTEN_FDS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kit.bridgekit import eventually
from kit.faultkit import Bridge, Ledger, Proc, Sims, assert_delivered_once, caught_up, facts, serve, shops
from kit.hookkit import hook_sections, outcomes, receiver_url, wake_all

from klaviyo_bridge.sandbox.whiplash import OrderScript

SHOP = shops(801)[0]
LAUNCHER = """
import os, sys
fd, config = int(sys.argv[1]), sys.argv[2]
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "klaviyo_bridge", "run", "--config", config])
"""


@pytest.fixture
def held_socket() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port, owned by the test the way systemd owns the socket unit's."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as sock:
        yield sock


@contextlib.asynccontextmanager
async def activated(bridge: Bridge, sock: socket.socket) -> AsyncIterator[Proc]:
    """Run ``klaviyo-bridge run`` with ``sock`` passed as fd 3; kill it on the way out if still up."""
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)  # never 3 itself, so dup2 onto 3 always moves it
    os.set_inheritable(fd, True)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LAUNCHER, str(fd), str(bridge.config_path), env=bridge.env(), cwd=str(bridge.tmp),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    proc = Proc(process)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await proc.closed()


async def synced(bridge: Bridge, sims: Sims, limit_s: float = 30.0) -> None:
    """Wait until the bridge remembers every current status and has sent everything."""
    await eventually(lambda: caught_up(bridge.state_path, sims.whiplash, [SHOP.cid])
                     and facts(bridge.state_path).pending_rows == 0, limit_s=limit_s, what="the bridge to catch up")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_the_passed_socket_is_served_and_queues_webhooks_across_a_restart(
    tmp_path: Path, held_socket: socket.socket, stop: signal.Signals
) -> None:
    """1. The daemon (backstop poll 120 s) starts with the socket as fd 3. 2. An order moves: its webhook wakes
    the poller. 3. Stop the daemon (SIGTERM or SIGKILL); an order moves while it is down; start it again with
    the same socket. Result: it said it serves the systemd socket; the webhook sent while it was down waited in
    the kernel's backlog and was answered 202 by the new process (no delivery failed); every event once."""
    port = held_socket.getsockname()[1]
    async with serve([SHOP]) as sims:
        script = OrderScript(sims.whiplash, SHOP.cid, seed=8)
        script.backfill(10, days=5)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port)).write()
        hub = sims.whiplash.webhooks
        hub.timeout_s = 30.0  # a delivery may wait for the restart
        async with activated(bridge, held_socket) as proc:
            line = await proc.wait_for_line("webhooks listening", 20)
            assert f"from systemd socket http://127.0.0.1:{port} path=/whiplash/webhook" in line
            await wake_all(port)
            await synced(bridge, sims)
            sims.whiplash.subscribe(receiver_url(port), customer_id=SHOP.cid)
            script.spawn(1)
            ledger.observe_all()
            await synced(bridge, sims)
            proc.proc.send_signal(stop)
            await proc.wait(20)
        sent_while_down = len(hub.deliveries)
        script.spawn(1)
        ledger.observe_all()
        await asyncio.sleep(0.5)  # the delivery is now connected, waiting in the backlog
        assert not hub.is_idle
        async with activated(bridge, held_socket) as proc:
            await synced(bridge, sims)
            await eventually(lambda: hub.is_idle, limit_s=20, what="the queued delivery")
            assert await proc.stop() == 0
        assert len(hub.deliveries) > sent_while_down
        assert outcomes(list(hub.deliveries)) == {"delivered:202": len(hub.deliveries)}
        assert_delivered_once(sims, bridge, ledger)


async def test_without_activation_variables_the_daemon_binds_listen_itself(tmp_path: Path) -> None:
    """1. LISTEN_FDS set but LISTEN_PID naming another process (variables a parent leaked). Result: the daemon
    ignores them and binds [webhooks] listen itself."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with serve([SHOP]) as sims:
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port)).write()
        env = bridge.env() | {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "klaviyo_bridge", "run", "--config", str(bridge.config_path), env=env,
            cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        proc = Proc(process)
        try:
            line = await proc.wait_for_line("webhooks listening", 20)
            assert f"listening on http://127.0.0.1:{port} " in line
            assert await proc.stop() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
