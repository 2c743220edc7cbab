"""The receiver of Whiplash's signed webhooks: wake-up calls for the pollers, never a source of truth.

A verified webhook only asks its customer's poller to read Whiplash now; that poll reads and commits through
the same plan-and-commit path as every other, so a lost, late, repeated, reordered or forged webhook can
neither lose nor double an event (polling at the configured interval stays the backstop). The receiver is an
aiohttp server in the daemon's event loop, on ``[webhooks] listen`` or on the socket systemd passed.

Invariants:
- Nothing unverified is parsed: the raw body is read with a cap (``max_body_bytes``; a larger Content-Length
  is refused before reading) and its ``X-WHIPLASH-SIGNATURE`` (hex HMAC-SHA256 keyed with the client secret) is
  compared in constant time before anything looks inside. Unsigned or forged → 401, too large → 413, a signed
  body that is not a JSON object → 400; none of them wakes anything.
- A verified request is answered 202 as soon as its customer is woken: the receiver never polls, never writes
  state and never waits for a poll. Its customer is the order's ``customer_id`` (wrapped ``{"order": {...}}``
  or bare), else the customer whose memory holds the order id, else every running customer. One that is not
  running (unknown, disabled) is ignored and counted, still with 202: Whiplash need not retry it.
- A webhook wakes nobody when the order memory already holds the status it reports (the news was read by an
  earlier poll, e.g. the rest of a burst after the first poll committed it): a burst of webhooks about changes
  made before it costs about two polls, however long its delivery takes. Skipping can only delay (never lose)
  a change the status does not show, such as a new name, until the next poll.
- Every request that reaches the path is counted by outcome. No body, signature, secret or email reaches a log:
  a rejection logs its reason, at most one WARNING per reason per minute (the rest are counted in the line that
  follows), an acceptance its customer and order id at DEBUG.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp
from aiohttp import web

from .config import Settings
from .errors import BridgeError
from .metrics import MetricsSink
from .systemd import listen_sockets

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-WHIPLASH-SIGNATURE"
READ_CHUNK: Final = 64 * 1024
LOOKUP_TIMEOUT_S: Final = 2.0  # a state DB busy longer than this wakes everyone rather than hold the answer
REJECT_LOG_EVERY_S: Final = 60.0

Outcome = Literal["accepted", "already_seen", "unsigned", "bad_signature", "too_large", "malformed",
                  "unknown_customer", "ignored_disabled"]

_ADVICE: Final[dict[str, str]] = {
    "unsigned": "a request without X-WHIPLASH-SIGNATURE reached the webhook path; only Whiplash should reach it "
                "(check the reverse proxy)",
    "bad_signature": "the signature does not match: if every webhook is refused, set [webhooks] secret (default: "
                     "the Whiplash client secret) to the key Whiplash signs with; polling still delivers everything",
    "too_large": "a body over [webhooks] max_body_bytes was refused; raise it if Whiplash's orders are that large",
    "malformed": "a signed body that is not a JSON object was refused; polling still delivers everything",
}


@dataclass(frozen=True, slots=True)
class Targets:
    """What the receiver may do to the daemon, injected so it imports neither the daemon nor the workers."""

    wake: Callable[[int], bool]  # ask that customer's poller to poll now; False when no such customer runs
    running: Callable[[], Collection[int]]  # the customers being polled
    disabled: Callable[[int], bool]  # configured but disabled (ignored rather than unknown)
    customer_of_order: Callable[[int], Awaitable[int | None]]  # from the order memory; None when never seen
    status_of: Callable[[int, int], Awaitable[int | None]]  # (customer, order) → remembered status, if any


@dataclass(frozen=True, slots=True)
class Notice:
    """What a verified webhook says that the bridge uses: whose order, and which."""

    customer_id: int | None
    order_id: int | None
    status: int | None  # the order's status in the payload (a snapshot taken when Whiplash queued it)


def signature_ok(secret: bytes, body: bytes, signature: str) -> bool:
    """Tell whether ``signature`` is the hex HMAC-SHA256 of the raw ``body`` under ``secret`` (constant time)."""
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    given = signature.strip().lower().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected, given)


def parse_notice(body: bytes) -> Notice | None:
    """Read a verified body: ``{"order": {...}}`` or the bare order; None when it is not a JSON object."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(doc, dict):
        return None
    order = doc["order"] if isinstance(doc.get("order"), dict) else doc
    return Notice(_whole(order.get("customer_id")), _whole(order.get("id")), _whole(order.get("status"), 0))


def _whole(value: object, minimum: int = 1) -> int | None:
    """Return an integer of at least ``minimum`` given as a JSON number or a string of digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and value >= minimum else None


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """Read the whole body, or return None as soon as it exceeds ``limit`` bytes (chunked or lying lengths too)."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(min(READ_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)


class RejectLog:
    """One WARNING per rejection reason per ``every_s`` seconds; the lines in between are only counted."""

    def __init__(self, every_s: float = REJECT_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def rejected(self, outcome: str, status: int) -> None:
        """Log this rejection unless its reason was logged within the last ``every_s`` seconds."""
        now = self._clock()
        last = self._last.get(outcome)
        if last is not None and now - last < self._every_s:
            self._suppressed[outcome] += 1
            return
        self._last[outcome] = now
        log.warning("webhook rejected reason=%s status=%d suppressed_since_last=%d action=%s", outcome, status,
                    self._suppressed.pop(outcome, 0), _ADVICE.get(outcome, "none"))


class Receiver:
    """The request handler: size, signature, shape, customer, wake-up, count."""

    def __init__(self, secret: str, targets: Targets, metrics: MetricsSink, *, max_body_bytes: int,
                 reject_log: RejectLog | None = None) -> None:
        self._secret = secret.encode()
        self._targets = targets
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._reject_log = reject_log or RejectLog()

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one POST: 202 once verified and its customer woken, else the refusal (nothing woken)."""
        if (request.content_length or 0) > self._max_body:
            return self._reject("too_large", 413)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return self._reject("unsigned", 401)
        try:
            body = await read_capped(request, self._max_body)
        except (aiohttp.ClientError, ConnectionError):  # the sender went away mid-body
            return self._reject("malformed", 400)
        if body is None:
            return self._reject("too_large", 413)
        if not signature_ok(self._secret, body, signature):
            return self._reject("bad_signature", 401)
        notice = parse_notice(body)
        if notice is None:
            return self._reject("malformed", 400)
        self._metrics.webhook(await self._wake(notice))
        return web.Response(status=202, text="accepted\n")

    def _reject(self, outcome: Outcome, status: int) -> web.Response:
        """Count and (rate-limited) log a refusal; close the connection so an unread body is not waited for."""
        self._metrics.webhook(outcome)
        self._reject_log.rejected(outcome, status)
        response = web.Response(status=status, text=f"{outcome.replace('_', ' ')}\n")
        response.force_close()
        return response

    async def _wake(self, notice: Notice) -> Outcome:
        """Wake the notice's customer (looked up by order id if need be), or every running one."""
        cid = notice.customer_id
        if cid is None and notice.order_id is not None:
            cid = await self._lookup(self._targets.customer_of_order(notice.order_id))
        if cid is None:
            woken = sum(self._targets.wake(c) for c in list(self._targets.running()))
            log.debug("webhook accepted customer=unknown order=%s woken=%d", notice.order_id, woken)
            return "accepted"
        if cid not in self._targets.running():
            outcome: Outcome = "ignored_disabled" if self._targets.disabled(cid) else "unknown_customer"
            log.debug("webhook ignored customer=%s order=%s reason=%s", cid, notice.order_id, outcome)
            return outcome
        if await self._already_seen(cid, notice):
            log.debug("webhook accepted customer=%s order=%s poll=no reason=status_already_seen", cid, notice.order_id)
            return "already_seen"
        self._targets.wake(cid)
        log.debug("webhook accepted customer=%s order=%s", cid, notice.order_id)
        return "accepted"

    async def _already_seen(self, cid: int, notice: Notice) -> bool:
        """Tell whether the order memory already holds the status the webhook reports (no poll needed)."""
        if notice.order_id is None or notice.status is None:
            return False
        return await self._lookup(self._targets.status_of(cid, notice.order_id)) == notice.status

    async def _lookup(self, read: Awaitable[int | None]) -> int | None:
        """Await a read of the order memory; None (so: wake) when the state DB fails or is busy too long."""
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                return await read
        except (TimeoutError, BridgeError) as exc:
            log.debug("webhook order lookup failed error=%s", exc)
            return None


@dataclass(slots=True)
class WebhookServer:
    """A running receiver; ``close`` stops accepting and waits briefly for requests in progress."""

    runner: web.AppRunner
    where: str

    async def close(self) -> None:
        """Stop listening (a socket systemd passed stays open in systemd, so webhooks queue in the kernel)."""
        await self.runner.cleanup()


def webhook_app(receiver: Receiver, path: str) -> web.Application:
    """Build the application: POST on ``path`` only (anything else is 404 or 405 from aiohttp)."""
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    return app


async def start_receiver(
    receiver: Receiver, path: str, *, address: tuple[str, int] | None, sockets: Sequence[socket.socket] = (),
) -> WebhookServer:
    """Serve ``receiver`` on the passed ``sockets``, else on ``address`` (port 0: a free one).

    Raises OSError when the address cannot be bound.
    """
    runner = web.AppRunner(webhook_app(receiver, path), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        if sockets:
            sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in sockets]
        else:
            assert address is not None, "an address or a socket"
            sites = [web.TCPSite(runner, address[0], address[1])]
        for site in sites:
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    where = " ".join(_url(a) for a in runner.addresses)
    return WebhookServer(runner, f"{where} path={path}")


def _url(address: object) -> str:
    """Render a listening address as http://host:port."""
    host, port = address[:2] if isinstance(address, tuple) else (str(address), 0)
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


async def serve_webhooks(settings: Settings, targets: Targets, metrics: MetricsSink) -> WebhookServer | None:
    """Start the receiver when ``[webhooks] listen`` is set: on systemd's socket if one was passed, else bound
    here. A failure to bind costs the webhooks (logged), not the bridge: polling keeps delivering everything."""
    w = settings.webhooks
    if w.listen is None:
        if listen_sockets():
            log.warning("webhooks off but systemd passed a socket action=%s", "set [webhooks] listen (and restart), "
                        "or disable klaviyo-bridge.socket: webhooks sent to it wait unanswered")
        return None
    receiver = Receiver(settings.webhook_secret().get_secret_value(), targets, metrics,
                        max_body_bytes=w.max_body_bytes)
    passed = listen_sockets()
    try:
        server = await start_receiver(receiver, w.path, address=w.address(), sockets=passed)
    except OSError as exc:
        log.error("webhooks not listening listen=%s error=%s action=%s", w.listen, exc,
                  "free the port or change [webhooks] listen, then restart; until then polling alone delivers, "
                  "at poll_interval_seconds")
        return None
    source = "from systemd socket" if passed else "on"
    log.info("webhooks listening %s %s max_body_bytes=%d", source, server.where, w.max_body_bytes)
    return server
