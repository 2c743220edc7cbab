"""Command line: ``klaviyo-bridge run | check-config | status``.

Exit codes follow sysexits where systemd cares: 0 ok, 78 (EX_CONFIG) bad configuration — the unit's
``RestartPreventExitStatus=78`` stops a restart loop on a config that can never work — and 1 fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from . import __version__, demo, logs, ops
from .config import LoadedConfig, default_config_path, load_config
from .errors import ConfigError, StoreError
from .sandbox import cli as sandbox_cli
from .status import render_status, status_rows

EX_OK = 0
EX_FATAL = 1
EX_UNHEALTHY = 2
EX_CONFIG = 78
CONFIG_HELP = "config file (default: $KLAVIYO_BRIDGE_CONFIG or /etc/klaviyo-bridge/config.toml)"

log = logging.getLogger("klaviyo_bridge")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="klaviyo-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help=CONFIG_HELP)
    run.add_argument("--once", action="store_true", help="poll every customer once, deliver, and exit")
    run.set_defaults(handler=cmd_run)
    check = sub.add_parser("check-config", help="validate the config; one line per problem, exit 78 if any")
    check.add_argument("--config", type=Path, help=CONFIG_HELP)
    check.set_defaults(handler=cmd_check_config)
    status = sub.add_parser("status", help="per-customer state read from the state DB (safe while running)")
    status.add_argument("--config", type=Path, help=CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)
    # Commands that live with their own module; each adds its parsers and sets `handler`.
    for module in (ops, demo, sandbox_cli):
        module.register(sub)
    return parser


def load_or_report(path: Path | None) -> LoadedConfig | None:
    """Load the config, printing each problem on its own line; None when it is unusable."""
    target = path or default_config_path(os.environ)
    try:
        loaded = load_config(target)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    return loaded


def register_secrets(loaded: LoadedConfig) -> None:
    """Tell the log redactor every secret value in the config."""
    s = loaded.settings
    values = [s.whiplash.client_secret, s.whiplash.refresh_token, *(c.klaviyo_api_key for c in s.customers)]
    for secret in values:
        if secret is not None:
            logs.register_secret(secret.get_secret_value())


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config file."""
    loaded = load_or_report(args.config)
    if loaded is None:
        return EX_CONFIG
    s = loaded.settings
    print(f"config ok: {len(s.customers)} customers ({len(s.enabled_customers())} enabled)")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until stopped (or once)."""
    from .daemon import Daemon  # deferred: check-config and status need not import aiohttp

    path = args.config or default_config_path(os.environ)
    loaded = load_or_report(path)
    if loaded is None:
        return EX_CONFIG
    register_secrets(loaded)
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
    loaded = load_or_report(args.config)
    if loaded is None:
        return EX_CONFIG
    try:
        rows = asyncio.run(status_rows(loaded.settings, datetime.now().astimezone()))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_FATAL
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(render_status(rows))
    limit = timedelta(seconds=3 * loaded.settings.bridge.poll_interval_seconds)
    return EX_UNHEALTHY if any(r.is_stale(limit) for r in rows) else EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klaviyo-bridge`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code
