"""The naive peer: what a merchant's developer would write with the official ``klaviyo-api`` Python SDK.

A sequential loop. Fetch the orders changed since the backfill start from Whiplash (OAuth client credentials,
page by page), find or create the list, then for each order: upsert the profile (``create_or_update_profile``),
add it to the list (``add_profiles_to_list``) and create its event (``create_event``). No bulk endpoints, no
pacing: the SDK's own retry (exponential backoff honouring Retry-After) absorbs the 429s. ``max_retries`` is
raised from the SDK's default 3 to 10, as a developer would after the first "429 after 3 retries" crash.

The SDK is pointed at the simulator with ``KlaviyoAPI(api_key, test_host=<base url>)``: the wrapper sets
``configuration.host`` from ``test_host``, so every call goes to that base URL (the SDK pins revision
2026-10-15 in its own header). Whiplash is read with urllib3, which the SDK already depends on.

Usage: ``PEER_KLAVIYO_KEY=pk_... python baseline_sdk.py --whiplash URL --klaviyo URL --customer ID --since ISO``
(the Whiplash client secret comes from $BENCH_WHIPLASH_SECRET). Prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import urllib3
from klaviyo_api import KlaviyoAPI

CLIENT_ID = "bench-client"
METRICS = {100: "Processing order", 160: "Processing order", 40: "Order cancelled", 300: "Order shipped",
           350: "Order delivered"}
PER_PAGE = 100


def whiplash_token(http: urllib3.PoolManager, base: str) -> str:
    """Get an access token with the client-credentials grant."""
    fields = {"grant_type": "client_credentials", "client_id": CLIENT_ID,
              "client_secret": os.environ["BENCH_WHIPLASH_SECRET"], "scope": "user_read"}
    reply = http.request("POST", f"{base}/oauth/token", fields=fields, encode_multipart=False)
    return str(json.loads(reply.data)["access_token"])


def orders_since(http: urllib3.PoolManager, base: str, customer: int, since: str) -> Iterator[dict[str, Any]]:
    """Yield every order of the customer updated since ``since``, page by page."""
    headers = {"Authorization": f"Bearer {whiplash_token(http, base)}", "X-CUSTOMER-ID": str(customer),
               "Accept": "application/json"}
    page = 1
    while True:
        query = {"search": json.dumps({"updated_at_gteq": since}), "sort": "updated_at asc,id asc",
                 "page": str(page), "per_page": str(PER_PAGE)}
        rows = json.loads(http.request("GET", f"{base}/api/v2/orders", fields=query, headers=headers).data)
        yield from rows
        if len(rows) < PER_PAGE:
            return
        page += 1


def find_or_create_list(klaviyo: KlaviyoAPI, name: str) -> str:
    """Return the id of the list called ``name``, creating it if missing."""
    found = klaviyo.Lists.get_lists(filter=f'any(name,["{name}"])')  # the form get_lists declares for name
    if found.data:
        return str(found.data[0].id)
    created = klaviyo.Lists.create_list({"data": {"type": "list", "attributes": {"name": name}}})
    return str(created.data.id)


def push(klaviyo: KlaviyoAPI, list_id: str, order: dict[str, Any]) -> None:
    """Upsert the shopper, add them to the list, create the order's event: three calls, one after another."""
    email = order["email"]
    profile = {"email": email, "first_name": order.get("first_name"), "last_name": order.get("last_name")}
    upserted = klaviyo.Profiles.create_or_update_profile(
        {"data": {"type": "profile", "attributes": {k: v for k, v in profile.items() if v}}})
    klaviyo.Lists.add_profiles_to_list(list_id, {"data": [{"type": "profile", "id": upserted.data.id}]})
    status = int(order["status"])
    event = {"properties": {"OrderId": str(order["id"]), "Status": status}, "time": order["updated_at"],
             "unique_id": f"{order['id']}:{status}", "metric": {"data": {"type": "metric", "attributes": {
                 "name": METRICS.get(status, "Processing order")}}},
             "profile": {"data": {"type": "profile", "attributes": {"email": email}}}}
    klaviyo.Events.create_event({"data": {"type": "event", "attributes": event}})


def main() -> None:
    """Run the loop once over the backfill window and print a summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--whiplash", "--klaviyo", "--since"):
        parser.add_argument(name, required=True)
    parser.add_argument("--customer", type=int, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    http = urllib3.PoolManager()
    klaviyo = KlaviyoAPI(os.environ["PEER_KLAVIYO_KEY"], max_retries=10, test_host=args.klaviyo)
    list_id = find_or_create_list(klaviyo, "Whiplash")
    count = 0
    for order in orders_since(http, args.whiplash, args.customer, args.since):
        if order.get("email") and int(order["status"]) in METRICS:
            push(klaviyo, list_id, order)
            count += 1
    print(f"peer pushed {count} orders with {3 * count} calls in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
