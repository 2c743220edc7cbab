"""A ready-made sandbox world: both simulators, three demo merchants, and a bridge config pointing at them.

Shared by ``klaviyo-bridge sandbox`` (manual exploration) and ``klaviyo-bridge demo``.

Invariants:
- Every credential here is a simulator credential, made up and printed on purpose; none is a real secret.
- The written config holds no credential itself: secrets are ``env:`` references resolved from
  ``bridge_env``, exactly as production configs should do it.
- Whiplash is served on the requested port and Klaviyo on the next one (both free ports when 0 is asked
  for), because both APIs own ``/api/`` and ``/__sim/`` and cannot share one origin.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the simulators (aiohttp, pydantic) load only when a sandbox is built: `status` stays fast
    from .klaviyo import FakeKlaviyo
    from .whiplash import FakeWhiplash, OrderScript, StatusChange

CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-client-secret-0001"  # the simulator's own credential; printed on purpose
SECRET_ENV = "SANDBOX_WHIPLASH_SECRET"
SAMPLE_EMAIL = "bridge-samples@example.com"
REVISION = "2026-07-15"
# Variables that would change how the daemon logs (journald style) or notifies; a demo child must not inherit them.
_CHILD_ENV_DROP = ("JOURNAL_STREAM", "NOTIFY_SOCKET", "KLAVIYO_BRIDGE_CONFIG")


@dataclass(frozen=True, slots=True)
class SandboxCustomer:
    """One demo merchant: its Whiplash id, its simulated Klaviyo key, and its launch settings."""

    cid: int
    name: str
    api_key: str
    launch_date: date
    backfill_days: int
    orders: int
    revoked: bool = False
    list_name: str = "Whiplash"
    history_before_launch: bool = False  # history ends at launch, so only what moves afterwards is live
    events: tuple[str, ...] | None = None  # [[customers]] events (None: the default, all four)
    metrics: tuple[tuple[str, str], ...] = ()  # [customers.metrics]: (event, the merchant's own metric name)

    @property
    def env_name(self) -> str:
        """Return the environment variable the config reads this customer's Klaviyo key from."""
        return f"SANDBOX_KLAVIYO_KEY_{self.cid}"

    @property
    def window_start(self) -> datetime:
        """Return the oldest change the bridge reads for this customer (launch 00:00 UTC − backfill days)."""
        return datetime.combine(self.launch_date, time.min, UTC) - timedelta(days=self.backfill_days)

    def is_launched(self, now: datetime) -> bool:
        """Tell whether the launch day has begun (before it the bridge only sets the customer up)."""
        return now >= datetime.combine(self.launch_date, time.min, UTC)


def demo_customers(today: date) -> list[SandboxCustomer]:
    """Return the demo merchants: launching today with backfill, pre-launch, live with a revoked key, and live
    with a partial choice of events (one under its own metric name)."""
    return [
        SandboxCustomer(101, "Aurora Records", "pk_sandbox_aurora_7f3a9c1e5b", today, 14, 60,
                        history_before_launch=True),
        SandboxCustomer(202, "Borealis Apparel", "pk_sandbox_borealis_2d8e4f6a0c", today + timedelta(days=2), 14, 15),
        SandboxCustomer(303, "Cedar & Sage", "pk_sandbox_cedar_9b1c3e5d7f", today - timedelta(days=7), 0, 20,
                        revoked=True),
        SandboxCustomer(404, "Dune Outfitters", "pk_sandbox_dune_4a6c8e0b2d", today - timedelta(days=3), 3, 25,
                        events=("shipped", "delivered"), metrics=(("delivered", "Dune: Order delivered"),)),
    ]


@dataclass
class Sandbox:
    """Both simulators, with one seeded order script per customer."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    customers: list[SandboxCustomer]
    scripts: dict[int, OrderScript] = field(default_factory=dict)

    def tick(self, *, share: float = 0.3, spawn: int = 0) -> list[StatusChange]:
        """Move orders one lifecycle step (each with probability ``share``) and add ``spawn`` new ones each."""
        changes: list[StatusChange] = []
        for script in self.scripts.values():
            script.spawn(spawn)
            changes += script.tick(share=share)
        return changes


def build_sandbox(
    customers: list[SandboxCustomer], *, days: float = 45.0, seed: int = 7,
    spec_path: Path | Literal["auto"] | None = "auto",
) -> Sandbox:
    """Create the simulators: order history over ``days`` per customer, one Klaviyo account per customer."""
    from .klaviyo import FakeKlaviyo  # deferred: the simulators load only when a sandbox is built
    from .whiplash import FakeWhiplash, OrderScript  # (the same: `status` and the CLI's start stay fast)

    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, seed=seed)
    klaviyo = FakeKlaviyo(spec_path=spec_path, seed=seed)
    sandbox = Sandbox(whiplash, klaviyo, customers)
    for offset, c in enumerate(customers):
        script = OrderScript(whiplash, c.cid, seed=seed + offset)
        launch = c.window_start + timedelta(days=c.backfill_days)
        script.backfill(c.orders, days=days, end=min(launch, whiplash.now()) if c.history_before_launch else None)
        whiplash.scripts[c.cid] = sandbox.scripts[c.cid] = script
        klaviyo.add_account(c.api_key, label=str(c.cid))
        if c.revoked:
            klaviyo.revoke(c.api_key)
    return sandbox


@dataclass(frozen=True, slots=True)
class SandboxUrls:
    """Where the two simulators listen."""

    whiplash: str
    klaviyo: str


@asynccontextmanager
async def serve_sandbox(
    sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
) -> AsyncIterator[SandboxUrls]:
    """Serve Whiplash on ``port`` and Klaviyo on ``port + 1`` (both free ports when ``port`` is 0)."""
    from .klaviyo import serve_klaviyo  # deferred: the simulators load only when a sandbox is served
    from .whiplash import serve_whiplash  # (the same: `status` and the CLI's start stay fast)

    async with AsyncExitStack() as stack:
        w_url = await stack.enter_async_context(serve_whiplash(sandbox.whiplash, host, port, access_log=access_log))
        k_url = await stack.enter_async_context(serve_klaviyo(sandbox.klaviyo, host, port + 1 if port else 0))
        yield SandboxUrls(w_url, k_url)


def toml_str(value: str) -> str:
    """Quote a TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def config_text(
    urls: SandboxUrls, state_path: Path, customers: list[SandboxCustomer], *, poll_interval: float = 1.0,
    key_probe: float = 5.0, grace: float = 5.0, webhooks_listen: str | None = None,
) -> str:
    """Return a bridge config for the sandbox; every secret is an ``env:`` reference (see ``bridge_env``).

    With ``webhooks_listen`` the bridge's webhook receiver is on (its key: the simulator's client secret).
    """
    head = f"""# klaviyo-bridge against the built-in simulators (written by klaviyo-bridge demo/sandbox).
[bridge]
state_path = {toml_str(str(state_path))}
poll_interval_seconds = {poll_interval}
shutdown_grace_seconds = {grace}

[whiplash]
base_url = {toml_str(urls.whiplash)}
client_id = {toml_str(CLIENT_ID)}
client_secret = "env:{SECRET_ENV}"
overlap_seconds = 30
timeout_seconds = 10.0

[klaviyo]
base_url = {toml_str(urls.klaviyo)}
revision = {toml_str(REVISION)}
default_profile_email = {toml_str(SAMPLE_EMAIL)}
key_probe_seconds = {key_probe}
timeout_seconds = 10.0
"""
    if webhooks_listen is not None:
        head += f"\n[webhooks]\nlisten = {toml_str(webhooks_listen)}\n"
    return head + "".join(_customer_block(c) for c in customers)


def _customer_block(c: SandboxCustomer) -> str:
    """Return one ``[[customers]]`` block."""
    return f"""
[[customers]]
whiplash_customer_id = {c.cid}
name = {toml_str(c.name)}
klaviyo_api_key = "env:{c.env_name}"
launch_date = {c.launch_date.isoformat()}
backfill_days = {c.backfill_days}
list_name = {toml_str(c.list_name)}
""" + _events_lines(c)


def _events_lines(c: SandboxCustomer) -> str:
    """Return a customer's ``events`` key and ``[customers.metrics]`` table, when it has them."""
    text = "" if c.events is None else f"events = [{', '.join(toml_str(e) for e in c.events)}]\n"
    if c.metrics:
        text += "[customers.metrics]\n" + "".join(f"{event} = {toml_str(name)}\n" for event, name in c.metrics)
    return text


def secret_env(customers: list[SandboxCustomer]) -> dict[str, str]:
    """Return the variables the sandbox config's ``env:`` references name."""
    return {SECRET_ENV: CLIENT_SECRET, **{c.env_name: c.api_key for c in customers}}


def bridge_env(customers: list[SandboxCustomer], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment to run the bridge against the sandbox with (base: os.environ)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _CHILD_ENV_DROP}
    return {**env, **secret_env(customers), "PYTHONUNBUFFERED": "1"}
