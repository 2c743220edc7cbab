"""Kit of the fault suite: simulators on loopback, a config writer, the real daemon as a subprocess, in-process
workers with fast retries, and the Klaviyo state the delivery contract demands, derived from what Whiplash said.

The expectation is exact, not a guess: ``Ledger`` keeps every state of every order that the bridge was made to
observe (tests change an order only once the bridge's state DB shows it caught up with the current state), and
replays those states through the pure mapping core. The unique_ids Klaviyo recorded must equal that set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from kit.bridgekit import LoggedProcess, toml_str
from kit.fakeclock import FakeClock
from klaviyo_bridge import core
from klaviyo_bridge.config import LoadedConfig, Settings, load_config
from klaviyo_bridge.klaviyo import KlaviyoClient
from klaviyo_bridge.orders import parse_order
from klaviyo_bridge.ratelimit import AccountLimiter
from klaviyo_bridge.sandbox.klaviyo import Account, FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.store import Store
from klaviyo_bridge.whiplash import WhiplashClient
from klaviyo_bridge.whiplash_auth import TokenManager, WhiplashAuth
from klaviyo_bridge.worker import CustomerWorker

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "bridge-client"
CLIENT_SECRET = "whiplash-secret-value-1"
SEED_TOKEN = "seed-refresh-token-0123456789abcdef"
SAMPLE_EMAIL = "bridge-samples@example.com"
SAMPLES = frozenset(f"sample:{kind.value}" for kind in core.EventKind)
TODAY = datetime.now(UTC).date()


@dataclass(frozen=True)
class Shop:
    """One merchant: a Whiplash customer id and its Klaviyo key; live since yesterday with 14 days of history."""

    cid: int
    key: str
    launch: date = TODAY - timedelta(days=1)
    backfill_days: int = 14
    events: tuple[str, ...] | None = None  # [[customers]] events; None: the default (all four)
    metrics: tuple[tuple[str, str], ...] = ()  # [customers.metrics]: (event, the merchant's own metric name)

    @property
    def label(self) -> str:
        """Return the label of its simulated Klaviyo account."""
        return str(self.cid)

    @property
    def env_name(self) -> str:
        """Return the environment variable the config reads its key from."""
        return f"FAULT_KLAVIYO_KEY_{self.cid}"


def shops(*cids: int) -> list[Shop]:
    """Return shops with distinct keys."""
    return [Shop(cid, f"pk_fault_{cid}_0123456789abcdef") for cid in cids]


@dataclass
class Sims:
    """Both simulators, served on 127.0.0.1."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    whiplash_url: str
    klaviyo_url: str

    def account(self, shop: Shop) -> Account:
        """Return the shop's simulated Klaviyo account."""
        return self.klaviyo.account(shop.label)

    def duplicates(self) -> int:
        """Return how many events Klaviyo received again under a unique_id it already had (all accounts)."""
        return sum(acct.duplicate_events for acct in self.klaviyo.accounts)


def fake_whiplash(cls: type[FakeWhiplash] = FakeWhiplash, *, revoked_on_use: bool = True) -> FakeWhiplash:
    """Return a Whiplash with rotating refresh tokens (Doorkeeper's revoke-on-use by default)."""
    return cls(CLIENT_ID, CLIENT_SECRET, refresh_token=SEED_TOKEN, refresh_revoked_on_use=revoked_on_use)


@contextlib.asynccontextmanager
async def serve(
    merchants: Sequence[Shop], *, whiplash: FakeWhiplash | None = None, klaviyo: FakeKlaviyo | None = None
) -> AsyncIterator[Sims]:
    """Serve a Whiplash (``fake_whiplash()`` unless given) and a Klaviyo with an account per shop."""
    whiplash = whiplash or fake_whiplash()
    for shop in merchants:
        whiplash.add_customer(shop.cid)
    klaviyo = klaviyo or FakeKlaviyo()
    for shop in merchants:
        klaviyo.add_account(shop.key, label=shop.label)
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        yield Sims(whiplash, klaviyo, w_url, k_url)


# --------------------------------------------------------------------------------------------- config


def config_text(state: Path, sims: Sims, merchants: Sequence[Shop], sections: Mapping[str, Mapping[str, str]]) -> str:
    """Return a config: test defaults, overridden per section by raw TOML values in ``sections``."""
    values: dict[str, dict[str, str]] = {
        "bridge": {"state_path": toml_str(str(state)), "poll_interval_seconds": "1.0",
                   "shutdown_grace_seconds": "5.0"},
        "whiplash": {"base_url": toml_str(sims.whiplash_url), "grant": '"refresh_token"',
                     "client_id": toml_str(CLIENT_ID), "client_secret": '"env:FAULT_WHIPLASH_SECRET"',
                     "refresh_token": '"env:FAULT_WHIPLASH_REFRESH"', "page_size": "10", "overlap_seconds": "60",
                     "timeout_seconds": "5.0"},
        "klaviyo": {"base_url": toml_str(sims.klaviyo_url), "default_profile_email": toml_str(SAMPLE_EMAIL),
                    "key_probe_seconds": "1.0", "timeout_seconds": "5.0"},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                   for name, keys in values.items())
    for shop in merchants:
        text += (f"[[customers]]\nwhiplash_customer_id = {shop.cid}\nname = \"Shop {shop.cid}\"\n"
                 f"klaviyo_api_key = \"env:{shop.env_name}\"\nlaunch_date = {shop.launch.isoformat()}\n"
                 f"backfill_days = {shop.backfill_days}\n")
        if shop.events is not None:
            text += f"events = [{', '.join(toml_str(e) for e in shop.events)}]\n"
        if shop.metrics:
            text += "[customers.metrics]\n" + "".join(f"{e} = {toml_str(n)}\n" for e, n in shop.metrics)
        text += "\n"
    return text


@dataclass
class Bridge:
    """The real ``klaviyo-bridge`` process, configured for the simulators."""

    tmp: Path
    sims: Sims
    merchants: list[Shop]
    sections: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        """Return where the config is written."""
        return self.tmp / "config.toml"

    @property
    def state_path(self) -> Path:
        """Return the state DB path."""
        return self.tmp / "state" / "bridge.db"

    def write(self) -> Bridge:
        """Write the config file and return self."""
        self.config_path.write_text(config_text(self.state_path, self.sims, self.merchants, self.sections))
        self.state_path.parent.mkdir(exist_ok=True)  # as systemd's StateDirectory= would: the bridge never does
        return self

    def env(self, failpoints: str = "") -> dict[str, str]:
        """Return the process environment: secrets as env references, failpoints when armed."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KLAVIYO_", "FAULT_", "NOTIFY_", "JOURNAL_STREAM", "WATCHDOG_"))}
        env |= {"FAULT_WHIPLASH_SECRET": CLIENT_SECRET, "FAULT_WHIPLASH_REFRESH": SEED_TOKEN,
                "PYTHONUNBUFFERED": "1"}
        env |= {shop.env_name: shop.key for shop in self.merchants}
        if failpoints:
            env["KLAVIYO_BRIDGE_FAILPOINTS"] = failpoints
        return env

    def loaded(self) -> LoadedConfig:
        """Load the written config as the daemon does."""
        return load_config(self.config_path, self.env())

    def rules(self) -> dict[int, core.Rules]:
        """Return the mapping rules of every shop, as the daemon derives them."""
        settings = self.loaded().settings
        return {c.whiplash_customer_id: settings.rules_for(c) for c in settings.customers}

    async def once(self, failpoints: str = "", limit_s: float = 60.0) -> Finished:
        """Run ``run --once`` to completion."""
        async with self.running("--once", failpoints=failpoints) as proc:
            code = await proc.wait(limit_s)
        return Finished(code, proc.log)

    @contextlib.asynccontextmanager
    async def running(self, *args: str, failpoints: str = "", command: str = "run") -> AsyncIterator[Proc]:
        """Start the process; kill it on the way out if it is still up."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "klaviyo_bridge", command, *args, "--config", str(self.config_path),
            env=self.env(failpoints), cwd=str(self.tmp),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        proc = Proc(process)
        try:
            yield proc
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await proc.closed()


@dataclass
class Finished:
    """Exit code and output of a finished bridge process."""

    code: int
    log: str


class Proc(LoggedProcess):
    """A running bridge process whose output is collected line by line."""

    async def wait(self, limit_s: float) -> int:
        """Wait for the exit code (failing after ``limit_s``)."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            raise AssertionError(f"bridge still running after {limit_s}s; log:\n{self.log}") from None
        await self.closed()
        return code

    async def exited_within(self, seconds: float) -> int | None:
        """Return the exit code if the process ends within ``seconds``, else None (still running)."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), seconds)
        return None

    async def stop(self, limit_s: float = 30.0) -> int:
        """SIGTERM the process (a graceful stop) and return its exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(limit_s)

    async def kill(self) -> int:
        """SIGKILL the process (if still up) and return its exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        return await self.wait(10.0)



# ------------------------------------------------------------------------------------ the state DB


@dataclass(frozen=True)
class Facts:
    """What the state DB holds, read directly with sqlite3 (the daemon may be dead or alive)."""

    pending_events: dict[int, int]
    pending_rows: int
    dead: list[tuple[int, str, int | None, str]]  # customer, key, status, response
    statuses: dict[int, dict[int, int]]  # customer -> order id -> remembered status
    refresh_token: str | None
    integrity: list[str]
    poll_errors: dict[int, str | None]


def facts(path: Path) -> Facts:
    """Read the state DB's outbox, memory, token and integrity in one short read-only connection."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        pending = dict(db.execute("SELECT customer_id, count(*) FROM outbox WHERE kind = 'event' AND "
                                  "sent_at IS NULL AND dead_at IS NULL GROUP BY customer_id").fetchall())
        pending_rows = db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL").fetchone()
        dead = db.execute("SELECT customer_id, key, last_status, coalesce(response, '') FROM outbox "
                          "WHERE dead_at IS NOT NULL ORDER BY id").fetchall()
        statuses: dict[int, dict[int, int]] = {}
        for cid, oid, status in db.execute("SELECT customer_id, order_id, status FROM orders"):
            statuses.setdefault(cid, {})[oid] = status
        token = db.execute("SELECT refresh_token FROM whiplash_token WHERE id = 1").fetchone()
        integrity = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
        errors = dict(db.execute("SELECT customer_id, last_error FROM customers").fetchall())
    finally:
        db.close()
    return Facts(pending, int(pending_rows[0]), dead, statuses, None if token is None else token[0], integrity,
                 errors)


def caught_up(path: Path, whiplash: FakeWhiplash, cids: Iterable[int]) -> bool:
    """Tell whether the bridge remembers every order of these customers at its current Whiplash status."""
    if not path.exists():
        return False
    try:
        known = facts(path).statuses
    except sqlite3.Error:
        return False  # not created or migrated yet
    wanted = set(cids)
    current = {o.id: o.status for o in whiplash.orders.values() if o.customer_id in wanted}
    remembered = {oid: s for cid in wanted for oid, s in known.get(cid, {}).items()}
    return remembered == current


# --------------------------------------------------------------------------------- the expectation


@dataclass
class Ledger:
    """Every state of every order that the bridge was made to observe, and the events they mandate."""

    whiplash: FakeWhiplash
    states: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def observe_all(self) -> None:
        """Record the current state of every order (call only when the bridge will see it)."""
        for oid in self.whiplash.orders:
            self.observe(oid)

    def observe(self, oid: int) -> None:
        """Record an order's current state if its status differs from the last one recorded."""
        now = self.whiplash.order_json(oid)
        seen = self.states.setdefault(oid, [])
        if not seen or seen[-1]["status"] != now["status"]:
            seen.append(now)

    def expected(self, rules: core.Rules) -> set[str]:
        """Return the unique_ids the contract demands for one customer: each observed state, replayed, and a
        sample of each metric it gets."""
        ids = {row.unique_id for row in core.sample_events(rules, SAMPLE_EMAIL, datetime.now(UTC))}
        known: dict[int, core.OrderMemory] = {}
        for oid, states in self.states.items():
            if self.whiplash.orders[oid].customer_id != rules.customer_id:
                continue
            for raw in states:
                plan = core.plan_page(rules, [parse_order(raw)], known, {}, datetime.now(UTC))
                known.update(plan.orders)
                ids.update(row.unique_id for row in plan.events)
        return ids

    def emails(self, cid: int) -> set[str]:
        """Return the normalised emails of the customer's orders (one Klaviyo profile each)."""
        found = {SAMPLE_EMAIL}
        for states in self.states.values():
            order = parse_order(states[-1])
            if order.customer_id == cid and order.email:
                found.add(order.email)
        return found


def recorded_ids(account: Account) -> list[str]:
    """Return the unique_ids of the events Klaviyo kept, in arrival order."""
    return [e.unique_id or "" for e in account.events]


def assert_delivered_once(sims: Sims, bridge: Bridge, ledger: Ledger) -> None:
    """Check the contract: Klaviyo holds exactly the expected events, one profile per email (all on the list),
    nothing left queued, no dead letter, and a sound state DB."""
    rules = bridge.rules()
    for shop in bridge.merchants:
        account = sims.account(shop)
        got = recorded_ids(account)
        assert len(got) == len(set(got)), "Klaviyo kept a unique_id twice"
        expected = ledger.expected(rules[shop.cid])
        assert set(got) == expected, (f"customer {shop.cid}: missing {sorted(expected - set(got))[:10]}, "
                                      f"unexpected {sorted(set(got) - expected)[:10]}")
        emails = {p.email for p in account.profiles.values()}
        assert emails == ledger.emails(shop.cid)
        whiplash_list = account.list_named("Whiplash")
        assert whiplash_list is not None
        assert set(whiplash_list.members) == set(account.profiles)
    state = facts(bridge.state_path)
    assert state.pending_rows == 0
    assert state.dead == []
    assert state.integrity == ["ok"]
    assert sims.klaviyo.rejections == []


# ------------------------------------------------------------------------------ in-process workers


@dataclass
class InProcess:
    """Customer workers of the real daemon code, built in the test's loop with fast retries."""

    settings: Settings
    store: Store
    clock: FakeClock  # real time plus what drain() skips forward
    workers: dict[int, CustomerWorker]
    sessions: list[aiohttp.ClientSession]

    async def cycle(self) -> None:
        """Poll and deliver once for every customer, concurrently (like ``run --once``)."""
        await asyncio.gather(*(w.run_once() for w in self.workers.values()))

    async def drain(self, *, rounds: int = 30) -> None:
        """Cycle until nothing is queued, probing refused keys again and jumping the clock to retries."""
        for _ in range(rounds):
            for w in self.workers.values():
                w.deliverer.key_refused = False  # what the sender's key probe does after key_probe_seconds
            await self.cycle()
            nxt = [at for cid in self.workers if (at := await self.store.next_due_at(cid)) is not None]
            if not nxt:
                return
            self.clock.advance(max(timedelta(), min(nxt) - self.clock.utc()) + timedelta(seconds=1))
        raise AssertionError("outbox did not drain")


@contextlib.asynccontextmanager
async def in_process(bridge: Bridge, *, klaviyo_tries: int = 5, whiplash_tries: int = 6) -> AsyncIterator[InProcess]:
    """Build one worker per shop over one store, with the daemon's components but millisecond backoffs."""
    settings = bridge.loaded().settings
    clock = FakeClock(real_time=True)
    store = await Store.open(settings.bridge.state_path)
    w, k = settings.whiplash, settings.klaviyo
    w_session = aiohttp.ClientSession()
    k_session = aiohttp.ClientSession()
    try:
        auth = WhiplashAuth(w.base_url, w.grant, w.client_id, w.client_secret, w.refresh_token, w.scope)
        tokens = TokenManager(w_session, auth, store, timeout=w.timeout_seconds)
        whiplash = WhiplashClient(w_session, tokens, base_url=w.base_url, page_size=w.page_size,
                                  timeout=w.timeout_seconds, max_tries=whiplash_tries, max_time=10,
                                  backoff_factor=0.01, backoff_cap=0.05)
        workers = {}
        for customer in settings.customers:
            client = KlaviyoClient(k_session, base_url=k.base_url, revision=k.revision,
                                   api_key=customer.klaviyo_api_key, limiter=AccountLimiter(k.rate_limit_share),
                                   timeout=k.timeout_seconds, max_tries=klaviyo_tries, max_time=10,
                                   backoff_base=0.01)
            workers[customer.whiplash_customer_id] = CustomerWorker(settings, customer, store, whiplash, client,
                                                                    clock.utc)
        yield InProcess(settings, store, clock, workers, [w_session, k_session])
    finally:
        await w_session.close()
        await k_session.close()
        await store.close()
