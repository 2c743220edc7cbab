"""The competent peer: what a merchant's developer who knows Klaviyo's bulk endpoints writes with the official SDK.

Sequential, a few dozen lines, and already far better than the naive loop (``baseline_sdk.py``): read the whole
window from Whiplash page by page (client credentials, 100 per page), find or create the list, then one profile
import job for every shopper (up to 10,000, adding them to the list), one event bulk-create job per 1,000 events,
and wait for the import job to complete. No pacing (the bulk limits are far away at this size), the SDK's own
retries for the rest (``max_retries`` 10, as in the naive peer).

Usage: ``PEER_KLAVIYO_KEY=pk_... python competent_sdk.py --whiplash URL --klaviyo URL --customer ID --since ISO``
(the Whiplash client secret comes from $BENCH_WHIPLASH_SECRET). Prints one summary line: orders, Klaviyo
requests, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import urllib3
from baseline_sdk import METRICS, PER_PAGE, find_or_create_list, whiplash_token
from klaviyo_api import KlaviyoAPI

EVENTS_PER_JOB = 1000
PROFILES_PER_JOB = 10_000


def read_window(http: urllib3.PoolManager, base: str, customer: int, since: str) -> list[dict[str, Any]]:
    """Return every order of the customer updated since ``since``, reading page after page."""
    headers = {"Authorization": f"Bearer {whiplash_token(http, base)}", "X-CUSTOMER-ID": str(customer),
               "Accept": "application/json"}
    orders: list[dict[str, Any]] = []
    page = 1
    while True:
        query = {"search": json.dumps({"updated_at_gteq": since}), "sort": "updated_at asc,id asc",
                 "page": str(page), "per_page": str(PER_PAGE)}
        rows = json.loads(http.request("GET", f"{base}/api/v2/orders", fields=query, headers=headers).data)
        orders += rows
        if len(rows) < PER_PAGE:
            return orders
        page += 1


def import_profiles(klaviyo: KlaviyoAPI, list_id: str, orders: list[dict[str, Any]]) -> list[str]:
    """Start one import job per 10,000 shoppers (each adding them to the list); return the job ids."""
    shoppers = {o["email"]: {"email": o["email"], "first_name": o.get("first_name"), "last_name": o.get("last_name")}
                for o in orders}
    profiles = [{"type": "profile", "attributes": {k: v for k, v in p.items() if v}} for p in shoppers.values()]
    jobs = []
    for start in range(0, len(profiles), PROFILES_PER_JOB):
        body = {"data": {"type": "profile-bulk-import-job",
                         "attributes": {"profiles": {"data": profiles[start:start + PROFILES_PER_JOB]}},
                         "relationships": {"lists": {"data": [{"type": "list", "id": list_id}]}}}}
        jobs.append(str(klaviyo.Profiles.bulk_import_profiles(body).data.id))
    return jobs


def create_events(klaviyo: KlaviyoAPI, orders: list[dict[str, Any]]) -> int:
    """Send one event per order in bulk-create jobs of 1,000; return how many requests that took."""
    events = [{"type": "event-bulk-create", "attributes": {
        "profile": {"data": {"type": "profile", "attributes": {"email": o["email"]}}},
        "events": {"data": [{"type": "event", "attributes": {
            "properties": {"OrderId": str(o["id"]), "Status": int(o["status"])}, "time": o["updated_at"],
            "unique_id": f"{o['id']}:{o['status']}",
            "metric": {"data": {"type": "metric", "attributes": {"name": METRICS[int(o["status"])]}}}}}]}}}
        for o in orders]
    requests = 0
    for start in range(0, len(events), EVENTS_PER_JOB):
        body = {"data": {"type": "event-bulk-create-job",
                         "attributes": {"events-bulk-create": {"data": events[start:start + EVENTS_PER_JOB]}}}}
        klaviyo.Events.bulk_create_events(body)
        requests += 1
    return requests


def wait_for(klaviyo: KlaviyoAPI, job_id: str) -> int:
    """Poll an import job until it is complete; return how many polls that took."""
    polls = 0
    while True:
        polls += 1
        job = klaviyo.Profiles.get_bulk_import_profiles_job(job_id)
        if job.data.attributes.status in ("complete", "cancelled"):
            return polls
        time.sleep(0.2)


def main() -> None:
    """Run the script once over the window and print a summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--whiplash", "--klaviyo", "--since"):
        parser.add_argument(name, required=True)
    parser.add_argument("--customer", type=int, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    http = urllib3.PoolManager()
    orders = [o for o in read_window(http, args.whiplash, args.customer, args.since)
              if o.get("email") and int(o["status"]) in METRICS]
    klaviyo = KlaviyoAPI(os.environ["PEER_KLAVIYO_KEY"], max_retries=10, test_host=args.klaviyo)
    list_id = find_or_create_list(klaviyo, "Whiplash")
    jobs = import_profiles(klaviyo, list_id, orders)
    event_requests = create_events(klaviyo, orders)
    polls = sum(wait_for(klaviyo, job) for job in jobs)
    print(f"competent peer pushed {len(orders)} orders: {len(jobs)} import job(s), {event_requests} event jobs, "
          f"{polls} job polls in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
