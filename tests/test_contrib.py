"""contrib/: the Prometheus alerting rules pass promtool's checks and unit tests; the Grafana dashboard is valid.

promtool comes from Debian's prometheus package (`make unit` provides it, see the Makefile); these tests fail,
never skip, without it. That the names used here are ones the daemon exports is tests/e2e/test_contrib_names.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kit.contribkit import (
    RULE_TESTS,
    RULES,
    alerting_rules,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    exported_names,
    label_values_metric,
    metric_names,
    plain_promql,
    referenced_names,
    rule_tests,
    run_promtool,
    variable_queries,
)

from klaviyo_bridge.metrics import Metrics

SEVERITIES = {"critical", "warning"}
CRITICAL = {"KlaviyoBridgeDown", "KlaviyoBridgePollStalled", "KlaviyoBridgeNoPollSinceStart",
            "KlaviyoBridgeKlaviyoKeyRefused"}
PER_INSTANCE = {"KlaviyoBridgeDown", "KlaviyoBridgeWebhooksRefused"}  # about the daemon, not one customer


def test_rules_pass_promtool_check() -> None:
    """1. promtool check rules on the shipped file. Result: exit 0, every rule found (no lint finding)."""
    output = run_promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(alerting_rules())} rules found" in output


def test_rules_pass_their_promtool_unit_tests() -> None:
    """1. promtool test rules on contrib/prometheus/klaviyo-bridge.rules.test.yml. Result: exit 0."""
    output = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """1. Collect, per alert, the unit-test evaluations that expect it and those that expect silence.
    Result: every alert of the rules file has at least one of each; the tests name no unknown alert."""
    names = {rule["alert"] for rule in alerting_rules()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in rule_tests():
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert names - firing == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a case where they must stay quiet"
    assert (firing | quiet) - names == set(), "tests name alerts the rules do not define"


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_is_paged_sensibly_and_says_what_to_do(rule: dict[str, str | dict[str, str]]) -> None:
    """1. Read one alerting rule. Result: a `for:` so one bad scrape does not page; a severity matching
    `status --check` (critical when orders stop flowing); a summary naming the customer (the daemon-down alert
    names the instance); a description; a runbook that names the command to run."""
    labels = rule["labels"]
    annotations = rule["annotations"]
    assert isinstance(labels, dict)
    assert isinstance(annotations, dict)
    assert rule.get("for"), "no for: one bad scrape would page"
    assert labels["severity"] in SEVERITIES
    assert (labels["severity"] == "critical") == (rule["alert"] in CRITICAL)
    assert ("{{ $labels.customer }}" in annotations["summary"]) == (rule["alert"] not in PER_INSTANCE)
    assert annotations["description"].strip()
    assert any(command in annotations["runbook"] for command in ("klaviyo-bridge status", "dead-letters"))
    assert "journalctl -u klaviyo-bridge" in annotations["runbook"]


def test_dashboard_has_the_variables_and_panels_ops_need() -> None:
    """1. Load the dashboard JSON. Result: schemaVersion ≥ 36; a Prometheus datasource variable that every
    panel and query uses; a customer variable from label_values(klaviyo_bridge_polls_total, customer);
    unique panel ids; panels for sent/queued/dead rows, poll lag and age, 429s, retries, upstream errors and
    streaks, and the key state."""
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variable_queries(board) == ["label_values(klaviyo_bridge_polls_total, customer)"]
    assert variables["customer"]["multi"]
    assert variables["customer"]["includeAll"]
    panels = list(dashboard_panels(board))
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    used = referenced_names()["dashboard"]
    assert {
        "klaviyo_bridge_sent_rows_total", "klaviyo_bridge_queued_rows", "klaviyo_bridge_dead_letters",
        "klaviyo_bridge_dead_rows_total", "klaviyo_bridge_poll_lag_seconds",
        "klaviyo_bridge_last_successful_poll_timestamp_seconds", "klaviyo_bridge_klaviyo_throttled_total",
        "klaviyo_bridge_retries_total", "klaviyo_bridge_upstream_errors_total",
        "klaviyo_bridge_upstream_error_streak_seconds", "klaviyo_bridge_klaviyo_key_refused",
        "klaviyo_bridge_oldest_queued_seconds",
    } <= used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """1. Put every panel query (Grafana variables replaced by values) in a throwaway file of recording
    rules. 2. promtool check rules. Result: exit 0, one rule per query: each one parses as PromQL."""
    exprs = [plain_promql(expr) for _, expr in dashboard_exprs(dashboard())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.json"  # JSON is YAML: promtool reads it as a rules file
    path.write_text(json.dumps(rules))
    output = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(exprs)} rules found" in output


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (customer) (rate(klaviyo_bridge_sent_rows_total{customer=~"7|8"}[5m])) * 60',
         {"klaviyo_bridge_sent_rows_total"}),
        ("time() - a_seconds > ignoring(customer) group_left 3 * b_seconds offset 5m", {"a_seconds", "b_seconds"}),
        ('sum without (outcome) (polls_total{outcome="error"}) >= 3 unless last_ok', {"polls_total", "last_ok"}),
        ('up{job="klaviyo-bridge"} == 0 or absent(up{job="klaviyo-bridge"})', {"up"}),
        ("x - min_over_time(x[30m]) > 1e3", {"x"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    """1. Extract metric names from PromQL. Result: selectors only, no functions, keywords, labels or units."""
    assert metric_names(expr) == names


def test_label_values_queries_name_their_metric() -> None:
    """1. A label_values variable query, with and without a matcher. Result: its metric."""
    assert label_values_metric("label_values(klaviyo_bridge_polls_total, customer)") == "klaviyo_bridge_polls_total"
    assert label_values_metric('label_values(up{job="x"}, instance)') == "up"


def test_exported_names_count_declared_families_without_samples() -> None:
    """1. Read a Metrics registry with one counter sample, in both exposition formats.
    Result: a counter is offered as name_total (and _created) even with no sample yet, never as its bare family
    name; unlabelled and labelled gauges are offered by name."""
    m = Metrics()
    m.sent(7, 2)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        names = exported_names(m.render(accept)[0].decode())
        assert {"klaviyo_bridge_sent_rows_total", "klaviyo_bridge_polls_total", "klaviyo_bridge_polls_created",
                "klaviyo_bridge_poll_interval_seconds", "klaviyo_bridge_klaviyo_key_refused"} <= names
        assert "klaviyo_bridge_polls" not in names
        assert "klaviyo_bridge_polls_total_total" not in names
