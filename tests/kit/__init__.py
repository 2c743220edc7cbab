"""Test kits shared by the suites: the bridge process, the simulators' worlds, expectations, one fake clock.

- ``bridgekit``: a logged bridge subprocess, TOML helpers, ``eventually``;
- ``harness`` / ``expect``: the e2e suite's config writer and expected Klaviyo state;
- ``faultkit``: the fault suite's simulators, config, crash kit, in-process workers and the delivery ledger;
- ``service_harness``: the daemon as a systemd service (notify socket, signals);
- ``contribkit``: promtool and the alerting rules and dashboard;
- ``fakeclock``: the one fake clock every test that needs time uses.
"""
