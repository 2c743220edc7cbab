"""Helpers for the tests of contrib/ (Prometheus rules, Grafana dashboard): promtool, and metric names.

``referenced_names`` lists the metric names the rules and the dashboard use; ``exported_names`` lists the
names a scrape of /metrics offers. Both sides are plain text matching, kept small on purpose: PromQL here is
ours, so a crude tokenizer that strips strings, matchers, ranges and label lists is enough.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "klaviyo-bridge.rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "klaviyo-bridge.rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "klaviyo-bridge.json"
PROVISIONED_PROMTOOL = REPO / ".venv" / "tools" / "promtool"  # where `make promtool` puts it

# Series Prometheus itself adds to every scrape target; the rules may use them though the bridge does not.
SCRAPE_SERIES = {"up"}

# Grafana's own variables, replaced by what Grafana would put there so the expression is plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${customer}": "7",
                     "$customer": "7"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "atan2", "inf", "nan"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile"}


def promtool() -> str:
    """Return the promtool to run: $PROMTOOL (set by `make unit`), one on PATH, or the one `make` provisioned."""
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool"), str(PROVISIONED_PROMTOOL)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("promtool not found: run `make promtool` (or `make test`), install Debian's prometheus package, "
                "or set PROMTOOL=/path/to/promtool")


def run_promtool(*args: str, cwd: Path = REPO) -> str:
    """Run promtool; fail the test with its output unless it exits 0. Return stdout and stderr together."""
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def alerting_rules() -> list[dict[str, Any]]:
    """Return every rule of the shipped rules file."""
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_tests() -> list[dict[str, Any]]:
    """Return the test groups of the promtool unit-test file."""
    tests: list[dict[str, Any]] = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return tests


def dashboard() -> dict[str, Any]:
    """Return the Grafana dashboard as loaded from its JSON file."""
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every panel, including those nested in collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (panel title, PromQL expression) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard_panels(board)
            for target in panel.get("targets", []) if target.get("expr")]


def variable_queries(board: dict[str, Any]) -> list[str]:
    """Return the queries of the dashboard's query variables (``label_values(metric, label)``)."""
    queries = []
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def plain_promql(expr: str) -> str:
    """Replace Grafana's variables by values, so that ``expr`` is PromQL promtool can check."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects (not functions, keywords or label names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        if s[m.end():].lstrip().startswith("(") or token.lower() in _KEYWORDS or token in _AGGREGATIONS:
            continue
        names.add(token)
    return names


def label_values_metric(query: str) -> str:
    """Return the metric of a ``label_values(metric, label)`` variable query."""
    m = re.fullmatch(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,\s*\w+\s*\)", query.strip())
    assert m, f"not a label_values(metric, label) query: {query!r}"
    return m.group(1)


def referenced_names() -> dict[str, set[str]]:
    """Return, per source (rules, dashboard), every metric name it uses."""
    in_rules = set().union(*(metric_names(rule["expr"]) for rule in alerting_rules()))
    board = dashboard()
    in_board = set().union(*(metric_names(plain_promql(expr)) for _, expr in dashboard_exprs(board)))
    in_board |= {label_values_metric(q) for q in variable_queries(board)}
    return {"rules": in_rules, "dashboard": in_board}


def exported_names(exposition: str) -> set[str]:
    """Return every metric name a Prometheus text exposition offers to queries.

    A family declared by ``# TYPE`` counts even without samples (a labelled metric nothing has recorded yet):
    its names are derived from the type. A counter is queried as ``foo_total`` (and ``foo_created``) whether
    it is declared as ``foo`` (OpenMetrics, what Prometheus asks for) or ``foo_total`` (the 0.0.4 text format).
    """
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",), "info": ("_info",),
                "summary": ("", "_sum", "_count", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
    names = set()
    for line in exposition.splitlines():
        if m := re.fullmatch(r"# TYPE (\S+) (\w+)", line):
            family = m.group(1).removesuffix("_total") if m.group(2) == "counter" else m.group(1)
            names |= {family + suffix for suffix in suffixes[m.group(2)]}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
