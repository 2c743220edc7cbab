"""Named crash points for fault tests: ``KLAVIYO_BRIDGE_FAILPOINTS=name=kill[,name=kill@N…]``.

At a named point the process SIGKILLs itself — no ``finally``, no flush — exactly like an OOM kill or
a power cut of the process. ``kill@N`` fires on the N-th time the point is reached (e.g. mid-batch).
Unset, ``hit`` is one falsy check: production pays nothing.

Points: ``after_fetch`` (a page fetched, nothing committed), ``during_cursor_update`` (inside the page
transaction, before COMMIT), ``after_outbox_commit`` (page committed, nothing sent), ``mid_batch`` (between
sends of one batch), ``after_send_before_mark`` (Klaviyo said 2xx, row not yet marked sent),
``during_token_refresh`` (new Whiplash tokens received, not yet stored).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

ENV = "KLAVIYO_BRIDGE_FAILPOINTS"
POINTS = frozenset(
    {
        "after_fetch",
        "during_cursor_update",
        "after_outbox_commit",
        "mid_batch",
        "after_send_before_mark",
        "during_token_refresh",
    }
)


def parse(spec: str) -> dict[str, int]:
    """Parse ``name=kill[@N],…`` into {name: hits before the kill}; unknown names or actions raise ValueError."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        verb, _, count = action.partition("@")
        if name not in POINTS or verb != "kill" or (count and not count.isdigit()) or count == "0":
            raise ValueError(f"bad failpoint {item!r}: expected one of {sorted(POINTS)} as name=kill[@N]")
        armed[name] = int(count or 1)
    return armed


def arm(environ: Mapping[str, str] | None = None) -> None:
    """(Re)read the failpoints from the environment."""
    global _armed
    _armed = parse((os.environ if environ is None else environ).get(ENV, ""))


def hit(name: str) -> None:
    """Kill the process here if the failpoint ``name`` is armed and its count is reached."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


_armed: dict[str, int] = {}
arm()
