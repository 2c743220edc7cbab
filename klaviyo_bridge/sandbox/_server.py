"""Serve a simulator's aiohttp application on a loopback port for the length of a ``with`` block.

Invariants: the site is bound before the base URL is yielded, and the runner is cleaned up on exit even when
the body raises, so no listening socket outlives the block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serve_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` on host:port (0 picks a free port) and yield its base URL, e.g. ``http://127.0.0.1:4711``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()
