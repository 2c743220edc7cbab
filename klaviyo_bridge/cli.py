"""Command line: run | check-config | status, plus the commands that register from their own modules.

Exit codes are defined once, in ``exits`` (and listed by ``--help``): a malformed command line exits 64
(EX_USAGE) like every other invocation error, a bad configuration 78 (EX_CONFIG) — the unit's
``RestartPreventExitStatus=78`` stops a restart loop on a config that can never work — and 1 is fatal.
Only commands that talk to an API resolve secrets; ``status`` needs none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, demo, logs, ops, subscriptions
from .alongside import stale_limit
from .clock import utcnow
from .config import Settings, default_config_path, load_or_report
from .errors import StoreError
from .exits import CHECK_UNKNOWN, CONFIG_HELP, EPILOG, EX_CONFIG, EX_FATAL, EX_OK, EX_UNHEALTHY, EX_USAGE
from .sandbox import cli as sandbox_cli
from .status import (
    CHECK_NAME,
    StatusRow,
    check,
    render_status,
    resolve_profile,
    status_report,
    status_rows,
)

log = logging.getLogger("klaviyo_bridge")
DESCRIPTION = "Send a 3PL's Whiplash order statuses into each merchant's own Klaviyo account."


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit 64 (EX_USAGE), not argparse's 2 (``status``'s "unhealthy")."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the problem, then exit 64."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every sub-command."""
    parser = Parser(prog="klaviyo-bridge", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help=CONFIG_HELP)
    run.add_argument("--once", action="store_true", help="poll every customer once, deliver, and exit")
    run.set_defaults(handler=cmd_run)
    check_config = sub.add_parser("check-config", help="validate the config; one line per problem, exit 78 if any")
    check_config.add_argument("--config", type=Path, help=CONFIG_HELP)
    check_config.set_defaults(handler=cmd_check_config)
    _register_status(sub)
    # Commands that live with their own module; each adds its parsers and sets `handler`.
    for module in (ops, subscriptions, demo, sandbox_cli):
        module.register(sub)
    return parser


def _register_status(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add ``status``."""
    status = sub.add_parser("status", help="per-customer state read from the state DB (no secrets needed)")
    status.add_argument("--config", type=Path, help=CONFIG_HELP)
    mode = status.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="machine-readable output")
    mode.add_argument("--check", action="store_true",
                      help="one monitoring-plugins line; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    mode.add_argument("--profile", metavar="REF",
                      help="print the email(s) behind a profile reference from the logs (profile=REF)")
    status.set_defaults(handler=cmd_status)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config file (secrets of enabled customers resolved, state folder checked)."""
    loaded = load_or_report(args.config)
    if loaded is None:
        return EX_CONFIG
    s = loaded.settings
    print(f"config ok: {len(s.customers)} customers ({len(s.enabled_customers())} enabled)")
    print(webhooks_line(s))
    return EX_OK


def webhooks_line(s: Settings) -> str:
    """Describe the webhook receiver the config asks for (never its key, only where the key comes from)."""
    w = s.webhooks
    if w.listen is None:
        return (f"webhooks: off, polling only every {s.bridge.poll_interval_seconds:g} s "
                "(set [webhooks] listen to have Whiplash's webhooks wake the pollers)")
    key = "webhooks.secret" if w.secret is not None else "whiplash.client_secret"
    return (f"webhooks: on listen={w.listen} (or the socket systemd passes) path={w.path} key={key} "
            f"max_body_bytes={w.max_body_bytes}; backstop poll every {s.bridge.poll_interval_seconds:g} s")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until stopped (or once)."""
    from .daemon import Daemon  # deferred: status and check-config need not import aiohttp and the clients

    path = args.config or default_config_path(os.environ)
    loaded = load_or_report(path)
    if loaded is None:
        return EX_CONFIG
    logs.setup_logging(loaded.settings.bridge.log_level, loaded.settings.bridge.log_format)
    try:
        return asyncio.run(Daemon(loaded, once=args.once, config_path=path).run())
    except StoreError as exc:
        log.critical("state database unusable: %s", exc)
        return EX_FATAL
    except Exception:
        # Logged here rather than by the interpreter so the traceback is one journal line with priority.
        log.critical("fatal error; exiting with status 1 (systemd restarts the service)", exc_info=True)
        return EX_FATAL


def cmd_status(args: argparse.Namespace) -> int:
    """Print per-customer state; non-zero when an enabled customer has stopped completing polls."""
    if args.check:
        return _status_check(args.config)
    loaded = load_or_report(args.config, resolve_secrets=False)
    if loaded is None:
        return EX_CONFIG
    settings = loaded.settings
    if args.profile is not None:
        return _print_profile(settings, args.profile)
    try:
        rows, budget = asyncio.run(status_report(settings, utcnow()))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_FATAL
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(render_status(rows))
        print(budget)
    return EX_UNHEALTHY if _any_stale(rows, settings) else EX_OK


def _any_stale(rows: Sequence[StatusRow], settings: Settings) -> bool:
    """Tell whether an enabled customer has not completed a poll within 3 poll intervals."""
    return any(r.is_stale(stale_limit(settings)) for r in rows)


def _status_check(path: Path | None) -> int:
    """Print one monitoring-plugins line and return its exit code (3 UNKNOWN when the state cannot be read)."""
    loaded = load_or_report(path, resolve_secrets=False)
    if loaded is None:
        print(f"{CHECK_NAME} UNKNOWN - configuration unusable (run klaviyo-bridge check-config)")
        return CHECK_UNKNOWN
    try:
        rows = asyncio.run(status_rows(loaded.settings, utcnow()))
    except StoreError as exc:
        print(f"{CHECK_NAME} UNKNOWN - {' '.join(str(exc).split())}")
        return CHECK_UNKNOWN
    code, line = check(rows, loaded.settings)
    print(line)
    return code


def _print_profile(settings: Settings, ref: str) -> int:
    """Print the customer and email of every profile whose log reference is ``ref``."""
    try:
        matches = asyncio.run(resolve_profile(settings, ref))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_FATAL
    if not matches:
        print(f"error: no profile with reference {ref!r} in the state database", file=sys.stderr)
        return EX_FATAL
    for customer_id, email in matches:
        print(f"profile={ref} customer={customer_id} email={email}")
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klaviyo-bridge`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code

