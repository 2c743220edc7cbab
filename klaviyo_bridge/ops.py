"""Commands for fixing things: ``dead-letters list|show|replay`` and ``resync``.

All of them work while the daemon runs: the state DB is in WAL mode, readers never block it, and the
writes here (a replay, a resync page) are short ``BEGIN IMMEDIATE`` transactions that wait out the daemon's
own through SQLite's busy timeout. Invariants:
- nothing here creates a state DB: a missing one is an error, because an empty DB would make a resync
  queue a whole window as if it had never been sent;
- a replay only makes dead rows pending again (same row, same ``unique_id``); the daemon's sender re-checks
  due rows at least once a minute, so it picks them up by itself;
- a resync commits through the same path as the poller (``sync.sync_window``) with the cursor untouched,
  so an event already queued or sent is never queued twice;
- a resync never rotates the Whiplash refresh token under a running daemon (see ``alongside.token_conflict``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp

from . import logs
from .alongside import open_store, token_conflict
from .clock import utcnow
from .config import load_or_report
from .core import midnight_utc, order_of_key
from .errors import BridgeError, StoreError
from .exits import CONFIG_HELP, EX_CONFIG, EX_FATAL, EX_OK, EX_TEMPFAIL, EX_USAGE
from .store import Store

if TYPE_CHECKING:
    from .config import CustomerSettings, Settings
    from .store import DeadLetter, DeadRow

RESYNC_LIMIT_DAYS = 14  # the backfill limit: the bridge never reads further back than this
EXCERPT_CHARS = 80
PICKUP_NOTE = "the running daemon sends {} within a minute (or run `klaviyo-bridge run --once`)"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``dead-letters``, ``resync`` and ``backup`` to the CLI."""
    _register_dead_letters(sub)
    _register_resync(sub)
    backup = sub.add_parser("backup", help="write a consistent copy of the state DB (safe while running)")
    backup.add_argument("--to", type=Path, required=True, metavar="PATH", help="where to write it (must not exist)")
    backup.add_argument("--config", type=Path, help=CONFIG_HELP)
    backup.set_defaults(handler=cmd_backup)


def _register_dead_letters(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``dead-letters list|show|replay``."""
    dl = sub.add_parser("dead-letters", help="inspect and re-queue rows Klaviyo refused")
    actions = dl.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    _add_scope(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_dead_list)
    show = actions.add_parser("show", help="one dead letter in full: payload and Klaviyo's response")
    show.add_argument("id", type=int, help="dead letter id (from `dead-letters list`)")
    show.add_argument("--config", type=Path, help=CONFIG_HELP)
    show.set_defaults(handler=cmd_dead_show)
    replay = actions.add_parser("replay", help="make dead letters pending again once the cause is fixed")
    replay.add_argument("ids", type=int, nargs="*", help="dead letter ids to replay")
    _add_scope(replay)
    replay.set_defaults(handler=cmd_dead_replay)


def _add_scope(parser: argparse.ArgumentParser) -> None:
    """Add ``--customer ID | --all`` and ``--config``."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--customer", type=int, metavar="ID", help="only this Whiplash customer id")
    scope.add_argument("--all", action="store_true", help="every customer")
    parser.add_argument("--config", type=Path, help=CONFIG_HELP)


def _register_resync(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``resync``."""
    resync = sub.add_parser("resync", help="re-read a window of a customer's orders from Whiplash")
    resync.add_argument("--customer", type=int, required=True, metavar="ID", help="Whiplash customer id")
    resync.add_argument("--since", type=_day, required=True, metavar="DATE",
                        help=f"first day to re-read, YYYY-MM-DD (UTC), at most {RESYNC_LIMIT_DAYS} days back")
    resync.add_argument("--config", type=Path, help=CONFIG_HELP)
    resync.set_defaults(handler=cmd_resync)


def _day(text: str) -> date:
    """Parse a YYYY-MM-DD argument."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2026-11-20: {text!r}") from None


def _load(args: argparse.Namespace, *, resolve_secrets: bool = False) -> Settings | None:
    """Load the config the way every command does (problems printed); only resync needs the secrets."""
    loaded = load_or_report(args.config, resolve_secrets=resolve_secrets)
    return None if loaded is None else loaded.settings


def _dead_letter_settings(args: argparse.Namespace) -> Settings | int:
    """Load the config for a dead-letters command; return the exit code instead when it is unusable or
    ``--customer`` names no configured customer (after saying so)."""
    settings = _load(args)
    if settings is None:
        return EX_CONFIG
    if args.customer is None or _find_customer(settings, args.customer) is not None:
        return settings
    return _fail(f"customer {args.customer} is not in the config (see `klaviyo-bridge status`)", EX_USAGE)


def _fail(message: str, code: int = EX_FATAL) -> int:
    """Print an error for ops and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def plural(n: int, noun: str) -> str:
    """Return "1 order", "2 orders"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------------------------------------------------
# dead-letters list


def cmd_dead_list(args: argparse.Namespace) -> int:
    """Print one line per dead letter."""
    settings = _dead_letter_settings(args)
    if isinstance(settings, int):
        return settings
    try:
        rows = asyncio.run(_dead_rows(settings, args.customer))
    except StoreError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([_dead_dict(r) for r in rows], indent=2))
    elif rows:
        print(render_dead_rows(rows))
    else:
        print("no dead letters")
    return EX_OK


async def _dead_rows(settings: Settings, customer_id: int | None) -> list[DeadRow]:
    """Read dead rows of one customer or all."""
    store = await open_store(settings, write=False)
    try:
        return await store.dead_rows(customer_id)
    finally:
        await store.close()


def order_id_of(kind: str, key: str) -> str | None:
    """Return the Whiplash order id of an event row (its unique_id is "{order}:{event}"), else None."""
    return order_of_key(key) if kind == "event" else None


def response_excerpt(response: str, limit: int = EXCERPT_CHARS) -> str:
    """Return one line saying why Klaviyo refused: its first error's code, detail and field, else the text."""
    text = _first_error(response) or response
    text = " ".join(text.split()) or "-"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_error(response: str) -> str | None:
    """Summarise a JSON:API error body's first error, or None when the body is not one."""
    try:
        errors = json.loads(response).get("errors")
        first = errors[0]
    except (ValueError, AttributeError, TypeError, IndexError, KeyError):
        return None
    if not isinstance(first, dict):
        return None
    source = first.get("source")
    pointer = source.get("pointer") if isinstance(source, dict) else None
    parts = [str(first.get("code") or first.get("title") or ""), str(first.get("detail") or "")]
    summary = ": ".join(p for p in parts if p) + (f" ({pointer})" if pointer else "")
    return summary or None


def row_name(kind: str, key: str) -> str:
    """Name an outbox row without personal data: an event by its unique_id, a profile by its reference."""
    return f"profile={logs.profile_ref(key)}" if kind == "profile" else key


def _dead_dict(row: DeadRow) -> dict[str, object]:
    """Return one dead row as JSON-ready data (a profile named by reference: `dead-letters show` has the email)."""
    return {
        "id": row.id,
        "customer_id": row.customer_id,
        "kind": row.kind,
        "key": row_name(row.kind, row.key),
        "order_id": order_id_of(row.kind, row.key),
        "status": row.status,
        "dead_at": row.dead_at.isoformat(timespec="seconds"),
        "attempts": row.attempts,
        "response": row.response,
    }


DEAD_COLUMNS = ("id", "customer", "kind", "key", "order", "status", "dead_at", "attempts", "klaviyo said")


def render_dead_rows(rows: Sequence[DeadRow]) -> str:
    """Render dead rows as an aligned table."""
    table = [list(DEAD_COLUMNS)] + [_dead_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(DEAD_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table)


def _dead_cells(row: DeadRow) -> list[str]:
    """Return one table line's cells."""
    return [
        str(row.id),
        str(row.customer_id),
        row.kind,
        row_name(row.kind, row.key),
        order_id_of(row.kind, row.key) or "-",
        "-" if row.status is None else str(row.status),
        row.dead_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        str(row.attempts),
        response_excerpt(row.response),
    ]


# ---------------------------------------------------------------------------------------------------------
# dead-letters show


def cmd_dead_show(args: argparse.Namespace) -> int:
    """Print one dead letter in full."""
    settings = _load(args)
    if settings is None:
        return EX_CONFIG
    try:
        letter = asyncio.run(_dead_letter(settings, args.id))
    except StoreError as exc:
        return _fail(str(exc))
    if letter is None:
        return _fail(f"no dead letter with id {args.id} (see `klaviyo-bridge dead-letters list`)")
    print(render_dead_letter(letter, _customer_name(settings, letter.customer_id)))
    return EX_OK


async def _dead_letter(settings: Settings, row_id: int) -> DeadLetter | None:
    """Read one dead letter."""
    store = await open_store(settings, write=False)
    try:
        return await store.dead_letter(row_id)
    finally:
        await store.close()


def _customer_name(settings: Settings, customer_id: int) -> str:
    """Return the configured name of a customer, or a note that it is not configured."""
    for c in settings.customers:
        if c.whiplash_customer_id == customer_id:
            return c.name
    return "not in the config"


def render_dead_letter(letter: DeadLetter, customer_name: str) -> str:
    """Render one dead letter: its facts, then payload and Klaviyo's response pretty-printed."""
    facts = [
        ("customer", f"{letter.customer_id} ({customer_name})"),
        ("kind", letter.kind),
        ("key", letter.key if letter.kind == "event" else f"{letter.key} ({row_name(letter.kind, letter.key)})"),
        ("order", order_id_of(letter.kind, letter.key) or "-"),
        ("http status", "-" if letter.status is None else str(letter.status)),
        ("attempts", str(letter.attempts)),
        ("queued at", letter.created_at.isoformat(timespec="seconds")),
        ("dead at", letter.dead_at.isoformat(timespec="seconds")),
        ("last retry error", letter.last_error or "-"),
    ]
    lines = [f"dead letter {letter.id}"] + [f"  {name + ':':<18}{value}" for name, value in facts]
    lines += ["payload (sent byte for byte on every attempt):", _pretty(letter.payload)]
    lines += ["klaviyo response:", _pretty(letter.response) if letter.response else "(none recorded)"]
    lines.append(f"replay it, once the cause is fixed, with: klaviyo-bridge dead-letters replay {letter.id}")
    return "\n".join(lines)


def _pretty(text: str) -> str:
    """Pretty-print JSON text; anything else is returned as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------------------
# dead-letters replay


def cmd_dead_replay(args: argparse.Namespace) -> int:
    """Make the selected dead letters pending again."""
    ids: list[int] = list(dict.fromkeys(args.ids))
    if not (ids or args.customer is not None or args.all):
        return _fail("say which dead letters to replay: ids, --customer ID, or --all", EX_USAGE)
    if ids and args.all:
        return _fail("give either ids or --all, not both", EX_USAGE)
    settings = _dead_letter_settings(args)
    if isinstance(settings, int):
        return settings
    try:
        _, missing = asyncio.run(replay(settings, args.customer, ids or None, sys.stdout))
    except StoreError as exc:
        return _fail(str(exc))
    if missing:
        shown = " ".join(str(i) for i in missing)
        return _fail(f"not dead letters (already replayed, sent, or unknown): {shown}")
    return EX_OK


async def replay(
    settings: Settings, customer_id: int | None, ids: Sequence[int] | None, out: TextIO
) -> tuple[int, list[int]]:
    """Replay dead rows (of a customer, or these ids); print what happened; return (replayed, missing ids)."""
    store = await open_store(settings, write=True)
    try:
        dead = {r.id: r for r in await store.dead_rows(customer_id)}
        chosen = [dead[i] for i in ids if i in dead] if ids is not None else list(dead.values())
        missing = [i for i in ids if i not in dead] if ids is not None else []
        replayed = await store.replay_dead(customer_id, [r.id for r in chosen], utcnow()) if chosen else 0
        print(f"replayed {plural(replayed, 'dead letter')}; {PICKUP_NOTE.format('them')}", file=out)
        for cid in sorted({r.customer_id for r in chosen}):
            note = await _replay_note(settings, store, cid)
            if note:
                print(note, file=out)
    finally:
        await store.close()
    return replayed, missing


async def _replay_note(settings: Settings, store: Store, customer_id: int) -> str | None:
    """Explain why a customer's replayed rows will not go out right away, if they will not."""
    customer = _find_customer(settings, customer_id)
    if customer is None or not customer.enabled:
        return f"note: customer {customer_id} is not enabled in the config; its rows wait until it is"
    state = await store.customer_state(customer_id)
    if not state.key_healthy:
        return f"note: customer {customer_id}'s Klaviyo key is refused; its rows go out once the key works"
    return None


def _find_customer(settings: Settings, customer_id: int) -> CustomerSettings | None:
    """Return the configured customer with this Whiplash id, if any."""
    return next((c for c in settings.customers if c.whiplash_customer_id == customer_id), None)


# ---------------------------------------------------------------------------------------------------------
# resync


def cmd_resync(args: argparse.Namespace) -> int:
    """Re-read a window of one customer's orders and queue what is missing."""
    settings = _load(args, resolve_secrets=True)
    if settings is None:
        return EX_CONFIG
    customer = _find_customer(settings, args.customer)
    if customer is None:
        return _fail(f"customer {args.customer} is not in the config", EX_USAGE)
    refusal = resync_refusal(customer, args.since, utcnow().date())
    if refusal is not None:
        return _fail(refusal, EX_USAGE)
    logs.setup_logging(settings.bridge.log_level, settings.bridge.log_format)
    return asyncio.run(run_resync(settings, customer, args.since, sys.stdout))


def resync_refusal(customer: CustomerSettings, since: date, today: date) -> str | None:
    """Return why a resync of ``customer`` from ``since`` (a UTC day) must not run, or None when it may."""
    cid = customer.whiplash_customer_id
    earliest = today - timedelta(days=RESYNC_LIMIT_DAYS)
    window = customer.launch_date - timedelta(days=customer.backfill_days)
    if since > today:
        return f"--since {since} is in the future (today is {today} UTC)"
    if since < earliest:
        return (f"--since {since} is more than {RESYNC_LIMIT_DAYS} days ago, beyond the backfill limit; "
                f"use {earliest} or later")
    if today < customer.launch_date:
        return (f"customer {cid} launches on {customer.launch_date}: the bridge reads nothing before that, and "
                "backfills by itself on launch day")
    if since < window:
        return (f"--since {since} is before customer {cid}'s window, which starts {window} "
                f"(launch_date {customer.launch_date} - backfill_days {customer.backfill_days}); "
                f"use {window} or later")
    return None


async def run_resync(settings: Settings, customer: CustomerSettings, since: date, out: TextIO) -> int:
    """Open the DB and Whiplash, walk the window with the cursor untouched, print a summary; return exit code."""
    try:
        store = await open_store(settings, write=True)
    except StoreError as exc:
        return _fail(str(exc))
    try:
        conflict = await token_conflict(settings, store, utcnow())
        if conflict is not None:
            return _fail(conflict, EX_TEMPFAIL)
        return await _resync_walk(settings, store, customer, since, out)
    finally:
        await store.close()


async def _resync_walk(settings: Settings, store: Store, customer: CustomerSettings, since: date, out: TextIO) -> int:
    """Walk Whiplash from ``since`` and commit every page without moving the cursor."""
    from .sync import sync_window  # deferred: only resync walks Whiplash; status and the rest skip the sync path
    from .whiplash import WhiplashClient  # deferred with sync_window: the orders client is resync's alone

    start = midnight_utc(since)
    cid = customer.whiplash_customer_id
    timeout = aiohttp.ClientTimeout(total=settings.whiplash.timeout_seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            whiplash = WhiplashClient.from_settings(settings.whiplash, session, store)
            stats = await sync_window(whiplash, store, settings.rules_for(customer), start,
                                      move_cursor=False, clock=utcnow)
    except BridgeError as exc:
        return _fail(f"resync customer={cid} failed: {exc}; pages committed before the failure are kept, "
                     "run the same command again")
    print(f"resync customer={cid} ({customer.name}) since={start.isoformat()}", file=out)
    print(f"fetched {plural(stats.fetched, 'order')} in {plural(stats.pages, 'page')}: "
          f"{plural(stats.queued, 'outbox row')} newly queued, {plural(stats.already_announced, 'order')} "
          f"already announced, {stats.skipped_no_email} without email, {stats.malformed} malformed", file=out)
    pickup = PICKUP_NOTE.format("the new rows") if customer.enabled else "new rows wait until it is enabled again"
    print(f"the daemon's cursor was not moved; {pickup}" if stats.queued else "nothing was missing", file=out)
    return EX_OK


# ---------------------------------------------------------------------------------------------------------
# backup


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the state DB consistently (SQLite's VACUUM INTO), then check the copy."""
    settings = _load(args)
    if settings is None:
        return EX_CONFIG
    try:
        size, ok = asyncio.run(backup(settings, args.to))
    except StoreError as exc:
        return _fail(str(exc))
    if not ok:
        return _fail(f"the copy at {args.to} fails its integrity check; keep the daemon running and try again")
    print(f"backup of {settings.bridge.state_path} written to {args.to} ({size} bytes, integrity ok)")
    return EX_OK


async def backup(settings: Settings, dest: Path) -> tuple[int, bool]:
    """Write the copy and tell (size, whether the copy passes PRAGMA integrity_check)."""
    store = await open_store(settings, write=False)
    try:
        size = await store.backup_into(dest)
    finally:
        await store.close()
    async with await Store.open_readonly(dest) as copy:
        return size, await copy.integrity_ok()
