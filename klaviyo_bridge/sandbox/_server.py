"""Serve a simulator's aiohttp application on a loopback port for the length of a ``with`` block.

Invariants: the site is bound before the base URL is yielded, and the runner is cleaned up on exit even when
the body raises, so no listening socket outlives the block. Shutdown waits at most ``shutdown_timeout`` for
in-flight requests, so a client holding a slow request cannot keep a test or the demo from ending. A client
that hangs up mid-request (``quiet_disconnects``, first middleware of both simulators) costs one DEBUG line,
never an aiohttp "Error handling request" traceback. The access log names method and path, never the
query string, which may carry a token (the Whiplash token endpoint also reads its parameters from it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger(__name__)

#: The status recorded for a request whose client left before the answer (nginx's "client closed request").
CLIENT_CLOSED = 499


@web.middleware
async def quiet_disconnects(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """End a request whose client hung up with one DEBUG line, not aiohttp's ERROR with a traceback."""
    try:
        return await handler(request)
    except ConnectionError:
        # Reading the rest of a body (or writing a streamed answer) after the peer left raises here; any
        # other ConnectionError would be a simulator bug, so it keeps its traceback.
        if request.transport is not None and not request.transport.is_closing():
            raise
        log.debug("sim client disconnected method=%s path=%s", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED)  # never delivered: aiohttp drops it on the closed transport


@asynccontextmanager
async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[str]:
    """Run ``app`` on host:port (0 picks a free port) and yield its base URL, e.g. ``http://127.0.0.1:4711``."""
    logger = logging.getLogger("aiohttp.access") if access_log else None
    runner = web.AppRunner(
        app, access_log=logger, access_log_class=QuerylessAccessLog, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield base_url(bound_host, bound_port)
    finally:
        await runner.cleanup()


class QuerylessAccessLog(AbstractAccessLogger):
    """One INFO line per request: client, method, path (never the query), status, seconds taken."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the line for one finished request."""
        self.logger.info(
            '%s "%s %s" %s %.3f', request.remote, request.method, request.path, response.status, time
        )


def base_url(host: str, port: int) -> str:
    """Return ``http://host:port``, bracketing an IPv6 address."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
