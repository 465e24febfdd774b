"""Alerts, recording rules and the Grafana dashboard, checked offline.

- ``promtool check rules`` and ``promtool test rules`` on the plain rule file; each alert's firing
  case is shown to matter by neutering the alert and watching the unit tests fail.
- Every alert carries a severity, a summary, a description and a runbook_url whose anchor is a
  section of docs/RUNBOOK.md; the PrometheusRule object is the rule file, rendered.
- Every metric named by an alert, a recording rule or a dashboard panel is exported by the code
  (``riffloop.runtime.metrics``), with the labels the queries select on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    DASHBOARD,
    MONITORING,
    PROMTOOL_TESTS,
    RULES_FILE,
    RUNBOOK,
    load_yaml,
    of_kind,
    render,
    require_tool,
    run,
)

pytestmark = pytest.mark.unit

RUNBOOK_BASE = "https://github.com/riffloop/riffloop/blob/main/docs/RUNBOOK.md#"
# The alerts the SREs asked for, by what they watch.
REQUIRED_ALERTS = {
    "RiffloopConsumerLagGrowing",  # consumer lag growing
    "RiffloopGrpcErrorRatioHigh",  # error ratio (gRPC)
    "RiffloopConsumerErrorRatioHigh",  # error ratio (Kafka consumers)
    "RiffloopGatewayLatencyP99High",  # gateway p99 latency
    "RiffloopDeadLetters",  # DLQ traffic
    "RiffloopSpamShareSpike",  # spam share spike
    "RiffloopModelRolledBack",  # model rolled back
    "RiffloopCurrentModelRatingFalling",  # mean rating of the current model falling
    "RiffloopTrainingFailures",  # trainer failures
}
# Labels Prometheus attaches to every scraped series (target labels), usable in any query.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
# Series that Prometheus itself writes, not the code.
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set()}


def rules() -> dict[str, Any]:
    return load_yaml(RULES_FILE)


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in all_rules() if "alert" in r}


def recordings() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in all_rules() if "record" in r}


# -- promtool ---------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "test", "rules", str(PROMTOOL_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", sorted(REQUIRED_ALERTS))
def test_unit_tests_fail_when_an_alert_never_fires(alert: str, tmp_path: Path) -> None:
    """Neuter one alert (an expression that is never true): the promtool tests must notice."""
    promtool = require_tool("promtool")
    rule_file = rules()
    for group in rule_file["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule_file))
    tests = load_yaml(PROMTOOL_TESTS)
    tests["rule_files"] = ["rules.yml"]
    # Only the cases where this alert is expected to fire (keeps each run short).
    tests["tests"] = [
        case
        for case in tests["tests"]
        if any(c["alertname"] == alert and c["exp_alerts"] for c in case.get("alert_rule_test", []))
    ]
    assert tests["tests"], f"no promtool test expects {alert} to fire"
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path)
    assert result.returncode != 0, f"no promtool test notices that {alert} never fires"
    assert alert in result.stdout + result.stderr


def test_every_alert_has_a_firing_case_and_a_healthy_silence() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(PROMTOOL_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == set(alerts()), f"alerts without a firing test: {set(alerts()) - fired}"
    assert silent == set(alerts()), f"alerts without a silent test: {set(alerts()) - silent}"


# -- alert metadata and the runbook -----------------------------------------------------------


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    if not RUNBOOK.is_file():
        return set()
    return {
        github_anchor(m.group(1))
        for m in re.finditer(r"^#{1,6} (.+)$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    }


def test_required_alerts_exist() -> None:
    assert set(alerts()) >= REQUIRED_ALERTS


def test_alerts_carry_severity_summary_and_runbook() -> None:
    anchors = runbook_anchors()
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchor == name.lower(), f"{name}: anchor {anchor}"
        assert anchor in anchors, f"docs/RUNBOOK.md has no section '{name}' (anchor #{anchor})"


def test_runbook_sections_say_what_how_and_what_to_do() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    for name in alerts():
        match = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert match, f"docs/RUNBOOK.md has no '## {name}' section"
        section = match.group(1)
        for part in ("**Meaning**", "**Check**", "**Act**"):
            assert part in section, f"{name}: section lacks {part}"


def test_prometheusrule_is_the_rule_file_rendered() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_prometheusrule", MONITORING / "render_prometheusrule.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == module.render(), (
        "prometheusrule.yaml is stale: run render_prometheusrule.py"
    )
    (rule_object,) = of_kind(render("production"), "PrometheusRule")
    assert rule_object["spec"]["groups"] == rules()["groups"]


# -- metric names: every name in deploy/k8s is exported by the code ----------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
_IDENT = r"(?<![A-Za-z0-9_.:$])([A-Za-z_:][A-Za-z0-9_:]*)"


def _without_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def promql_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords, labels and durations left out)."""
    text = _without_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    names = set()
    for match in re.finditer(_IDENT + r"(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names it matches on) for every `metric{...}` selector."""
    text = _without_strings(expr)
    original = expr
    out = []
    for match in re.finditer(_IDENT + r"\s*\{", text):
        # Read the matcher body from the original text (the strings are needed to find '}').
        start = match.end()
        body = original[start : original.index("}", start)]
        labels = set(
            re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", _without_strings(body))
        )
        out.append((match.group(1), labels))
    return out


def promql_grouping_labels(expr: str) -> set[str]:
    text = _without_strings(expr)
    labels: set[str] = set()
    for match in re.finditer(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        labels |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    return labels


def test_promql_name_extraction() -> None:
    """The extractor itself: a known expression yields exactly its metrics."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(riffloop_x_bucket{service="gateway", '
        'method!~".*Stream"}[5m]))) > 1e3 and on (model_version) label_replace(max by (version) '
        '(riffloop_y_info == 1), "model_version", "$1", "version", "(.+)") or up offset 1h '
        "or riffloop:z:ratio_rate10m"
    )
    assert promql_names(expr) == {
        "riffloop_x_bucket",
        "riffloop_y_info",
        "up",
        "riffloop:z:ratio_rate10m",
    }
    assert promql_selectors(expr) == [("riffloop_x_bucket", {"service", "method"})]
    assert promql_grouping_labels(expr) == {"le", "model_version", "version"}


def exported_series() -> dict[str, set[str]]:
    """Series names the code exposes, with their label names, read from the prometheus registry."""
    metrics = pytest.importorskip(
        "riffloop.runtime.metrics",
        reason="riffloop/runtime/metrics.py (module riffloop.runtime.metrics) does not exist yet",
    )
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    labelnames = {
        next(iter(obj.describe())).name: set(obj._labelnames)
        for obj in vars(metrics).values()
        if isinstance(obj, MetricWrapperBase)
    }
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "unknown": ("",),
    }
    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("riffloop_"):
            continue
        labels = labelnames.get(family.name, set())
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    assert series, "riffloop.runtime.metrics registered no riffloop_ metric"
    return series


def test_exported_series_follow_the_client_suffixes() -> None:
    """Control: counters are exposed as *_total, histograms as *_bucket/_sum/_count only."""
    exported = exported_series()
    assert "riffloop_ratings_total" in exported and "riffloop_ratings" not in exported
    assert "riffloop_generation_seconds_bucket" in exported
    assert "riffloop_generation_seconds" not in exported
    assert "le" in exported["riffloop_grpc_request_seconds_bucket"]
    assert exported["riffloop_kafka_consumer_lag"] == {"service", "topic"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def used_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in all_rules()] + [
        ("dashboard", e) for e in dashboard_exprs()
    ]


def test_every_metric_used_is_exported_by_the_code() -> None:
    exported = exported_series()
    recorded = set(recordings())
    for where, expr in used_exprs():
        for name in promql_names(expr):
            if ":" in name:
                assert name in recorded, f"{where}: recording rule {name} is not defined"
            else:
                assert name in exported or name in PROMETHEUS_SERIES, (
                    f"{where}: {name} is not exported by riffloop.runtime.metrics"
                )


def test_selected_labels_exist_on_the_metrics() -> None:
    exported = exported_series()
    recorded_labels = {
        name: promql_grouping_labels(rule["expr"]) for name, rule in recordings().items()
    }
    for where, expr in used_exprs():
        known = set(TARGET_LABELS) | {"le"}
        for name in promql_names(expr):
            known |= exported.get(name, set()) | recorded_labels.get(name, set())
            known |= PROMETHEUS_SERIES.get(name, set())
        # label_replace(..., "dst", ...) creates a label.
        known |= set(re.findall(r'label_replace\([^"]*"([A-Za-z_][A-Za-z0-9_]*)"', expr))
        for metric, labels in promql_selectors(expr):
            own = exported.get(metric, set()) | PROMETHEUS_SERIES.get(metric, set())
            assert labels <= own | TARGET_LABELS, f"{where}: {metric} has no label {labels - own}"
        assert promql_grouping_labels(expr) <= known, (
            f"{where}: groups by {promql_grouping_labels(expr) - known}, which no metric carries"
        )


def test_dashboard_shows_what_the_sres_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    names = set().union(*(promql_names(e) for e in dashboard_exprs()))
    for metric in (
        "riffloop_ratings_total",  # ratings/s
        "riffloop_mean_rating",  # mean rating per model version
        "riffloop_generation_seconds_bucket",  # generation latency p50/p99
        "riffloop_kafka_consumer_lag",  # consumer lag
        "riffloop_dlq_messages_total",  # DLQ rate
        "riffloop_spam_caught_total",  # spam share
    ):
        assert metric in names, f"no dashboard panel uses {metric}"
    generation = " ".join(e for e in dashboard_exprs() if "riffloop_generation_seconds" in e)
    assert "histogram_quantile(0.5," in generation and "histogram_quantile(0.99," in generation
    mean_rating = " ".join(e for e in dashboard_exprs() if "riffloop_mean_rating" in e)
    assert "by (model_version)" in mean_rating
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables >= {"datasource", "namespace"}


def test_dashboard_is_shipped_to_grafana() -> None:
    configmaps = [
        c
        for c in of_kind(render("production"), "ConfigMap")
        if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert len(configmaps) == 1
    (content,) = configmaps[0]["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
