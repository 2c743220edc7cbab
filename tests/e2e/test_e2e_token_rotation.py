"""The Whiplash refresh-token chain survives a restart of the real process.

Scenario: config ``grant = "refresh_token"`` with a seed token. Doorkeeper (the simulated Whiplash) revokes
every refresh token it rotates, so after the first run only the token the bridge saved in its state DB works.
Between runs every access token is expired, which forces the second run to refresh with the saved one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from kit.bridgekit import eventually
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.store import Store

CID = 101
KEY = "pk_rotation_0123456789abcd"
SEED = "seed-refresh-token-0123456789"


def token_refusals(w: FakeWhiplash) -> int:
    """Count the token requests the simulated Whiplash refused."""
    return sum(1 for r in w.counters.log if r.path == "/oauth/token" and r.status >= 400)


async def seed_is_refused(base_url: str) -> bool:
    """Tell whether the simulated Whiplash now refuses the seed refresh token."""
    body = {"grant_type": "refresh_token", "refresh_token": SEED, "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET}
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/oauth/token", json=body) as resp:
        return resp.status == 401


async def test_rotated_refresh_token_is_used_after_a_restart(tmp_path: Path) -> None:
    """1. Run the daemon, let it sync, SIGTERM. 2. Expire access tokens; add an order. 3. Run once.
    Result: the second run refreshes with the token saved in the state DB (the seed is revoked by then)
    and its poll delivers the new order; no secret appears in either log."""
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, refresh_token=SEED)
    first_order = int(whiplash.create_order(CID, status=300, email="first@example.com")["id"])
    klaviyo = FakeKlaviyo()
    acct = klaviyo.add_account(KEY, label=str(CID))
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        h = Harness(tmp_path, w_url, k_url, [Customer(CID, "Rotating Shop", KEY, datetime.now(UTC).date())],
                    overrides={"whiplash": {"grant": '"refresh_token"', "refresh_token": '"env:WHIPLASH_REFRESH"'}},
                    extra_env={"WHIPLASH_REFRESH": SEED})
        h.write_config()
        async with h.running() as bridge:
            await eventually(lambda: f"{first_order}:shipped" in {e.unique_id for e in acct.events}, what="sync")
            code, _ = await bridge.stop()
        assert code == 0, bridge.log
        assert whiplash.oauth.rotations == 1
        store = await Store.open(h.state_path, readonly=True)
        try:
            saved = await store.load_whiplash_token()
        finally:
            await store.close()
        assert saved is not None
        assert saved.refresh_token == whiplash.current_refresh_token != SEED
        assert await seed_is_refused(w_url)
        refusals = token_refusals(whiplash)

        whiplash.expire_access_tokens()
        second_order = int(whiplash.create_order(CID, status=100, email="second@example.com")["id"])
        again = await h.run("run", "--once")

    assert again.returncode == 0, again.stderr
    assert f"{second_order}:processing" in {e.unique_id for e in acct.events}
    assert whiplash.oauth.rotations == 2
    assert token_refusals(whiplash) == refusals  # the bridge never presented a revoked refresh token
    secrets = (SEED, CLIENT_SECRET, KEY, saved.refresh_token or "", saved.access_token)
    assert not [s for s in secrets if s in bridge.log + again.stderr]
