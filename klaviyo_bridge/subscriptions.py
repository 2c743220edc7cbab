"""``klaviyo-bridge webhooks list-events | subscribe``: register the receiver with Whiplash's notification API.

The same can be done by hand on Whiplash's Notifications page; this command does it for one customer, once:
an event already subscribed for that endpoint and customer is left alone, so running it twice changes nothing.
Invariants:
- it authenticates like the daemon (the configured OAuth application); with ``grant = "refresh_token"`` it uses
  the chain stored in the state DB and refuses (exit 75), as ``resync`` does, when a renewal would rotate the
  refresh token under a running daemon; with ``client_credentials`` it touches no state DB at all;
- what it sends that Whiplash does not document (``notification_type`` "webhook", ``version`` 2) is said in
  ``--help`` and in its output, so ops check the result in Whiplash's UI.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

import aiohttp

from .alongside import open_store, token_conflict
from .clock import utcnow
from .config import load_or_report
from .errors import BridgeError, StoreError
from .exits import CONFIG_HELP, EX_CONFIG, EX_FATAL, EX_OK, EX_TEMPFAIL, EX_USAGE
from .whiplash_auth import TokenManager

if TYPE_CHECKING:
    from .config import Settings
    from .notifications import NotificationClient, NotificationEvent, Subscription
    from .whiplash_auth import TokenRecord, TokenVault

# The order events worth a wake-up (a status the bridge announces may have changed). Those the fact sheet lists
# as CONFIRMED, plus order.status_changed and order.packed, whose API names are INFERRED from the UI's; a name
# missing from Whiplash's catalogue is skipped and said so.
DEFAULT_EVENTS = ("order.created", "order.status_changed", "order.batched", "order.packed", "order.cancelled",
                  "order.shipped", "order.delivered")
UNCONFIRMED_NOTE = ('note: sent notification_type="webhook" and version=2, values Whiplash does not document '
                    "(unconfirmed); check the subscriptions on Whiplash's Notifications page, and that "
                    'klaviyo_bridge_webhooks_total{outcome="accepted"} grows')


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``webhooks list-events`` and ``webhooks subscribe`` to the CLI."""
    hooks = sub.add_parser("webhooks", help="list Whiplash's notification events; subscribe the webhook receiver")
    actions = hooks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list-events", help="the notification events Whiplash offers")
    listing.add_argument("--config", type=Path, help=CONFIG_HELP)
    listing.set_defaults(handler=cmd_list_events)
    subscribe = actions.add_parser(
        "subscribe", help="subscribe a URL to order events of one customer (idempotent)",
        description="Create Whiplash webhook subscriptions (POST /api/v2/notification_subscriptions) for one "
                    "customer. UNCONFIRMED values: notification_type \"webhook\" and version 2 are sent because "
                    "Whiplash documents the fields but not their values; check the result in Whiplash's UI.")
    subscribe.add_argument("--customer", type=int, required=True, metavar="ID", help="Whiplash customer id")
    subscribe.add_argument("--url", required=True,
                           help="the public https URL of the receiver (the TLS proxy's, ending in [webhooks] path)")
    subscribe.add_argument("--event", action="append", metavar="NAME",
                           help=f"an event name (repeatable; default: {', '.join(DEFAULT_EVENTS)})")
    subscribe.add_argument("--config", type=Path, help=CONFIG_HELP)
    subscribe.set_defaults(handler=cmd_subscribe)


def cmd_list_events(args: argparse.Namespace) -> int:
    """Print Whiplash's notification events, marking those ``subscribe`` uses by default."""
    loaded = load_or_report(args.config)
    if loaded is None:
        return EX_CONFIG
    return asyncio.run(_with_client(loaded.settings, lambda client: _print_events(client, sys.stdout)))


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Subscribe ``--url`` to the order events of ``--customer``."""
    loaded = load_or_report(args.config)
    if loaded is None:
        return EX_CONFIG
    settings = loaded.settings
    problem = _usage_problem(settings, args.customer, args.url)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EX_USAGE
    wanted = tuple(args.event or DEFAULT_EVENTS)
    return asyncio.run(_with_client(
        settings, lambda client: _subscribe(client, args.customer, args.url, wanted, bool(args.event), sys.stdout)))


def _usage_problem(settings: Settings, customer_id: int, url: str) -> str | None:
    """Say why the arguments cannot be used, or None."""
    if not any(c.whiplash_customer_id == customer_id for c in settings.customers):
        return f"customer {customer_id} is not in the config (see `klaviyo-bridge status`)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--url must be an absolute http(s) URL (got {url!r})"
    if parts.path.rstrip("/") != settings.webhooks.path.rstrip("/"):
        return f"--url must end in the receiver's path {settings.webhooks.path} ([webhooks] path)"
    return None


async def _with_client(settings: Settings, work: Callable[[NotificationClient], Awaitable[int]]) -> int:
    """Run ``work(client)`` with a notification client on the configured application; map failures to codes."""
    from .notifications import NotificationClient  # deferred: only `webhooks` needs the notification API client

    w = settings.whiplash
    try:
        async with aiohttp.ClientSession() as session, _token_vault(settings) as vault:
            tokens = TokenManager.from_settings(w, session, vault)
            return await work(NotificationClient(session, tokens, base_url=w.base_url, timeout=w.timeout_seconds))
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except BridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_FATAL


class _Refused(Exception):
    """Running now would rotate the refresh token under a running daemon."""


class _MemoryVault:
    """Where a client_credentials token lives for one command: nothing to keep, nothing to rotate."""

    def __init__(self) -> None:
        self._record: TokenRecord | None = None

    async def load_whiplash_token(self) -> TokenRecord | None:
        """Return the token obtained by this command, if any."""
        return self._record

    async def save_whiplash_token(self, rec: TokenRecord) -> None:
        """Keep the token for this command only."""
        self._record = rec


@asynccontextmanager
async def _token_vault(settings: Settings) -> AsyncIterator[TokenVault]:
    """Yield the token's home: the state DB for a refresh-token chain (if no daemon renewal is due), else memory."""
    if settings.whiplash.grant != "refresh_token":
        yield _MemoryVault()
        return
    try:
        store = await open_store(settings, write=True)
    except StoreError as exc:
        raise BridgeError(f'{exc} (with grant = "refresh_token" the token chain lives there)') from None
    try:
        conflict = await token_conflict(settings, store, utcnow())
        if conflict is not None:
            raise _Refused(conflict)
        yield store
    finally:
        await store.close()


async def _print_events(client: NotificationClient, out: TextIO) -> int:
    """Print the catalogue, one event a line, default subscriptions marked with *."""
    events = await client.events()
    print(f"{'id':>6}  {'name':<32} {'resource':<10} humanized name", file=out)
    for e in sorted(events, key=lambda e: e.name):
        mark = " *" if e.name in DEFAULT_EVENTS else ""
        print(f"{e.id:>6}  {e.name + mark:<32} {e.resource_type:<10} {e.humanized_name}", file=out)
    print("* subscribed by `klaviyo-bridge webhooks subscribe` unless --event is given", file=out)
    return EX_OK


async def _subscribe(client: NotificationClient, customer_id: int, url: str, names: Sequence[str], chosen: bool,
                     out: TextIO) -> int:
    """Subscribe ``url`` to each named event not yet subscribed; return the exit code."""
    catalogue = {e.name: e for e in await client.events()}
    missing = [name for name in names if name not in catalogue]
    if missing and chosen:
        print(f"error: not in Whiplash's catalogue: {', '.join(missing)} (see `klaviyo-bridge webhooks "
              "list-events`)", file=sys.stderr)
        return EX_USAGE
    existing = await client.subscriptions()
    for name in names:
        if name in catalogue:
            await _subscribe_one(client, catalogue[name], customer_id, url, existing, out)
    for name in missing:
        print(f"not offered by Whiplash: {name} (skipped)", file=out)
    print(UNCONFIRMED_NOTE, file=out)
    return EX_OK


async def _subscribe_one(client: NotificationClient, event: NotificationEvent, customer_id: int, url: str,
                         existing: Sequence[Subscription], out: TextIO) -> None:
    """Create one subscription unless an active one for the same event, endpoint and customer exists."""
    same = next((s for s in existing if (s.event_id, s.endpoint, s.customer_id, s.active)
                 == (event.id, url, customer_id, True)), None)
    if same is not None:
        print(f"already subscribed customer={customer_id} event={event.name} id={same.id}", file=out)
        return
    created = await client.subscribe(event.id, url, customer_id)
    print(f"subscribed customer={customer_id} event={event.name} id={created.id} endpoint={url}", file=out)
