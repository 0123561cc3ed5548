"""deploy/prometheus: the alert rules are valid, pass their promtool unit tests, and use
only metrics the worker exposes (an alert on a misspelt name never fires)."""

from __future__ import annotations

import re

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from holdwall_stream.observability.metrics import Metrics
from tests.support.prometheus import ALERTS, PROMETHEUS_DIR, promtool

# Series Prometheus makes itself for every scrape target.
SCRAPE_SERIES = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}


def _alert_rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (function names and labels left out)."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return set(names) - PROMQL_WORDS


def _exposed_names() -> set[str]:
    text = generate_latest(Metrics().registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.add(f"{family.name}_bucket")
    return names


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x"}[5m]))) > 5 '
        'and on() max(b) == 1 or absent(up{job="holdwall-stream"} == 1)'
    )
    assert metric_names(expr) == {"a_bucket", "b", "up"}


def test_alerts_use_only_exposed_metrics() -> None:
    exposed = _exposed_names() | SCRAPE_SERIES
    rules = _alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        missing = metric_names(rule["expr"]) - exposed
        assert not missing, f"{rule['alert']} selects {sorted(missing)}, which no worker exposes"


def test_every_alert_has_severity_summary_and_runbook() -> None:
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), (rule["alert"], annotation)


def test_runbook_anchors_exist() -> None:
    runbook = (PROMETHEUS_DIR.parents[1] / "docs" / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for rule in _alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/RUNBOOK.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in RUNBOOK.md"


def test_rules_and_scrape_config_are_valid() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
