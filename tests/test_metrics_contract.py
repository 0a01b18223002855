"""Every metric the dashboard and the alert rules query is one the code exports.

The exported names come from the prometheus-client registry after importing every module of the
project's packages (so a metric defined anywhere is seen), expanded the way the text exposition
names samples: a counter ``x`` is ``x_total``, a histogram ``x`` is ``x_bucket``/``x_sum``/
``x_count``. The queried names come from parsing each PromQL expression (promql-parser), so a
renamed metric — or a renamed label used in a matcher or a ``by`` clause — fails here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import promql_parser
import yaml
from prometheus_client import REGISTRY

PROJECT = Path(__file__).resolve().parents[1]
DASHBOARD = PROJECT / "deploy" / "grafana" / "audience-relay.json"
ALERTS = PROJECT / "deploy" / "prometheus" / "alerts.yml"
PACKAGES = ("audience_relay", "ingress", "processors", "sinks", "schemas")
#: Series Prometheus itself adds to every scrape, not exported by any code.
PROMETHEUS_SERIES = {"up"}
#: Labels Prometheus adds to every series from the scrape target, plus the histogram bucket label.
TARGET_LABELS = {"job", "instance", "component", "sink", "le"}
#: Grafana's interval variables, replaced by a plausible value so the expression parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def import_everything() -> None:
    """Import every module of the project's packages, so every metric is registered."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            importlib.import_module(info.name)


def exported() -> dict[str, set[str]]:
    """Sample name → label names, for every metric in the default registry."""
    import_everything()
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # no public way to list the collectors
        describe = getattr(collector, "describe", None)
        families = list(describe() if describe else collector.collect())
        labels = set(getattr(collector, "_labelnames", ()))
        for family in families:
            family_labels = labels | set(getattr(family, "_labelnames", ()))
            for sample in family.samples:
                family_labels |= set(sample.labels)
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"),
                "gauge": ("",),
                "info": ("_info",),
            }.get(family.type, ("",))
            for suffix in suffixes:
                out.setdefault(family.name + suffix, set()).update(family_labels)
    return out


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def queries() -> Iterator[Query]:
    """Every PromQL expression of the alert rules and of the dashboard's panels."""
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield Query(f"alerts.yml {rule.get('alert') or rule.get('record')}", rule["expr"])
    dashboard = orjson.loads(DASHBOARD.read_bytes())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            yield Query(f"dashboard panel {panel['title']!r}", expr)


def problems(query: Query, metrics: dict[str, set[str]]) -> list[str]:
    """What in ``query`` names a metric or label the code does not export."""
    found: list[str] = []
    selectors: list[Any] = []
    grouping: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.extend(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(query.expr), visit)
    used_names: set[str] = set()
    for selector in selectors:
        name = selector.name
        if name is None:
            found.append(f"{query.where}: a selector without a metric name: {query.expr}")
            continue
        used_names.add(name)
        if name in PROMETHEUS_SERIES:
            continue
        if name not in metrics:
            found.append(f"{query.where}: {name} is not exported by the code")
            continue
        for matcher in selector.matchers.matchers:
            if matcher.name not in metrics[name] | TARGET_LABELS:
                found.append(f"{query.where}: {name} has no label {matcher.name!r}")
    known_labels = set().union(*(metrics.get(n, set()) for n in used_names)) | TARGET_LABELS
    for label in grouping:
        if label not in known_labels:
            found.append(f"{query.where}: grouping by {label!r}, a label none of its metrics has")
    return found


def test_every_queried_metric_and_label_is_exported() -> None:
    metrics = exported()
    all_queries = list(queries())
    assert len(all_queries) > 30, "the dashboard and the alerts hold fewer queries than expected"
    found = [p for q in all_queries for p in problems(q, metrics)]
    assert not found, "\n".join(found)
    queried = {m.group(0) for q in all_queries for m in re.finditer(r"relay_[a-z_]+", q.expr)}
    # Every component's metrics are on the dashboard or in an alert.
    for prefix in ("relay_ingress_", "relay_processor_", "relay_sink_", "relay_consumer_lag"):
        assert any(name.startswith(prefix) for name in queried), prefix


def test_a_renamed_metric_or_label_is_caught() -> None:
    """The check itself: a query naming what the code does not export is reported."""
    metrics = exported()
    assert "relay_sink_retries_total" in metrics and "relay_ingress_request_seconds_bucket" in metrics
    renamed = Query("t", 'sum(rate(relay_sink_retry_total{destination="odp"}[5m]))')
    assert problems(renamed, metrics) == ["t: relay_sink_retry_total is not exported by the code"]
    # A histogram is queried by its _bucket series, a counter by its _total series.
    assert problems(Query("t", "rate(relay_ingress_request_seconds[5m])"), metrics)
    assert problems(Query("t", "rate(relay_sink_retries[5m])"), metrics)
    assert problems(Query("t", 'relay_sink_retries_total{dest="odp"}'), metrics)
    assert problems(Query("t", "sum by (sink_name) (relay_sink_retries_total)"), metrics)
    # Removing a metric from what the code exports makes the real files fail.
    without = {k: v for k, v in metrics.items() if k != "relay_consumer_lag"}
    assert any("relay_consumer_lag is not exported" in p for q in queries() for p in problems(q, without))
