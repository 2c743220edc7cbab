"""``klaviyo-bridge webhooks list-events | subscribe`` against the simulated Whiplash's notification API.

The command runs through the real entry point (in a worker thread, with its own event loop, as from a shell)
while the simulator serves in the test's loop; outcomes are read from the simulator's subscriptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kit.bridgekit import toml_str

from klaviyo_bridge.cli import main
from klaviyo_bridge.exits import EX_FATAL, EX_OK, EX_USAGE
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.subscriptions import DEFAULT_EVENTS

CLIENT_ID, CLIENT_SECRET = "hooks-app", "hooks-app-secret-0001"
SHOP = 4321
URL = "https://hooks.example.net/whiplash/webhook"


@dataclass
class World:
    """The simulated Whiplash and a config pointing at it."""

    whiplash: FakeWhiplash
    config: Path
    url: str

    async def run(self, *args: str) -> int:
        """Run ``klaviyo-bridge <args> --config <config>`` as a shell would; return its exit code."""
        return await asyncio.to_thread(main, [*args, "--config", str(self.config)])

    def write(self, *, grant: str = "client_credentials", secret: str = CLIENT_SECRET) -> None:
        """Write the config (client secret from the environment, state folder present, no state DB)."""
        refresh = '\nrefresh_token = "seed-refresh-token-0123456789"' if grant == "refresh_token" else ""
        self.config.write_text(f"""
[bridge]
state_path = {toml_str(str(self.config.parent / "state" / "bridge.db"))}
[whiplash]
base_url = {toml_str(self.url)}
client_id = {toml_str(CLIENT_ID)}
client_secret = {toml_str(secret)}
grant = {toml_str(grant)}{refresh}
[klaviyo]
default_profile_email = "ops@example.com"
[[customers]]
whiplash_customer_id = {SHOP}
name = "Hook Shop"
klaviyo_api_key = "pk_hooks_0123456789abcdef"
launch_date = 2026-01-01
""")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Serve the simulated Whiplash (customer SHOP visible) and write a config for it."""
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, refresh_token="seed-refresh-token-0123456789")
    whiplash.add_customer(SHOP)
    (tmp_path / "state").mkdir()
    async with serve_whiplash(whiplash) as url:
        world = World(whiplash, tmp_path / "config.toml", url)
        world.write()
        yield world


async def test_list_events_prints_the_catalogue(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Result: exit 0; one line per event of Whiplash's catalogue; the default subscriptions marked *."""
    assert await world.run("webhooks", "list-events") == EX_OK
    out = capsys.readouterr().out
    for event in DEFAULT_EVENTS:
        assert f"{event} *" in out
    assert "order.dropship.packed " in out
    assert CLIENT_SECRET not in out


async def test_subscribe_creates_each_subscription_once(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """1. Subscribe URL for SHOP with the default events. 2. Run the same command again.
    Result: one active webhook subscription (notification_type "webhook", version 2) per default event for SHOP;
    the second run creates nothing and says so; the output names the unconfirmed values."""
    assert await world.run("webhooks", "subscribe", "--customer", str(SHOP), "--url", URL) == EX_OK
    first = capsys.readouterr().out
    subs = world.whiplash.webhooks.subscriptions
    assert sorted(s.event_name for s in subs) == sorted(DEFAULT_EVENTS)
    assert {(s.notification_type, s.version, s.endpoint, s.customer_id, s.active) for s in subs} == {
        ("webhook", 2, URL, SHOP, True)}
    assert first.count("subscribed customer=4321") == len(DEFAULT_EVENTS)
    assert 'notification_type="webhook" and version=2' in first
    assert await world.run("webhooks", "subscribe", "--customer", str(SHOP), "--url", URL) == EX_OK
    assert capsys.readouterr().out.count("already subscribed customer=4321") == len(DEFAULT_EVENTS)
    assert len(world.whiplash.webhooks.subscriptions) == len(DEFAULT_EVENTS)


async def test_chosen_events_only(world: World) -> None:
    """Result: --event (repeated) subscribes exactly those events."""
    code = await world.run("webhooks", "subscribe", "--customer", str(SHOP), "--url", URL,
                           "--event", "order.shipped", "--event", "order.delivered")
    assert code == EX_OK
    assert sorted(s.event_name for s in world.whiplash.webhooks.subscriptions) == ["order.delivered",
                                                                                   "order.shipped"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--customer", "999", "--url", URL], "customer 999 is not in the config"),
        (["--customer", str(SHOP), "--url", "hooks.example.net/whiplash/webhook"], "--url must be an absolute"),
        (["--customer", str(SHOP), "--url", "https://hooks.example.net/other"], "--url must end in"),
        (["--customer", str(SHOP), "--url", URL, "--event", "order.teleported"], "not in Whiplash's catalogue"),
    ],
)
async def test_bad_arguments_exit_64_and_create_nothing(
    world: World, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    """Result: a customer not in the config, a URL that is not the receiver's, an unknown event: exit 64, one
    error line, no subscription."""
    assert await world.run("webhooks", "subscribe", *args) == EX_USAGE
    assert says in capsys.readouterr().err
    assert world.whiplash.webhooks.subscriptions == ()


async def test_a_refused_secret_is_a_clean_failure(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A wrong client secret in the config. Result: exit 1, Whiplash's refusal in one line, the secret never
    printed."""
    world.write(secret="not-the-app-secret-42")
    assert await world.run("webhooks", "list-events") == EX_FATAL
    err = capsys.readouterr().err
    assert "whiplash 401" in err
    assert "not-the-app-secret-42" not in err


async def test_a_refresh_token_chain_is_only_used_from_the_state_db(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. grant = "refresh_token" and no state DB yet. Result: exit 1 and the reason; the seed refresh token was
    not spent (spending it here would leave the daemon a revoked chain)."""
    world.write(grant="refresh_token")
    assert await world.run("webhooks", "list-events") == EX_FATAL
    assert 'grant = "refresh_token" the token chain lives there' in capsys.readouterr().err
    assert world.whiplash.token_requests == {}
