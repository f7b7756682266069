"""The Grafana dashboard (deploy/grafana/privscore-dashboard.json) against a real server: every
metric a panel queries is served, with the labels the panel names, after real calls of each kind;
every privscore metric the server serves is on the dashboard; and the JSON is a Grafana
dashboard whose panels all read the `datasource` variable and filter on `job` and `instance`.

PromQL is parsed loosely, by regular expressions: metric names are the identifiers starting
`grpc_server_` or `privscore_`, a `_bucket`/`_sum`/`_count` name belongs to its histogram and a
`_total` name to its counter (as prometheus_client's parser names families). The drift metrics
are wired separately: until the server serves any `privscore_drift_` family, the drift names
alone are skipped, saying so; once it serves one, every one must be there.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from privscore.v1 import alert_service_pb2, common_pb2, limit_service_pb2
from tests.conftest import REPO_ROOT, ServerProcess, applicants

try:  # where the drift report draws its lines
    from service.monitoring.drift import PSI_ACT, PSI_WATCH
except ImportError:  # not landed yet: the values it is being written with
    PSI_WATCH, PSI_ACT = 0.1, 0.25

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "privscore-dashboard.json"
ROWS = ["RPC", "Decisions", "Audit", "Model", "Keys", "Drift", "Subscribers"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"\b(?:grpc_server|privscore)_[a-z_]+\b")
SELECTOR = re.compile(r"\b(?P<name>(?:grpc_server|privscore)_[a-z_]+)\s*\{(?P<matchers>[^}]*)\}")
MATCHER = re.compile(r'(?P<label>[A-Za-z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>[^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\((?P<labels>[^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
DRIFT = "privscore_drift_"
SCRAPER_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
NO_DRIFT_YET = (
    "no privscore_drift_ family is served yet (the drift metrics are not wired into the "
    "server); the dashboard's drift panels cannot be checked until they are"
)
CNY = "CNY"

Object = dict[str, Any]


# -- the dashboard ----------------------------------------------------------------------------


@functools.cache
def dashboard() -> Object:
    loaded: Object = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(container: Object) -> Iterator[Object]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    for panel in container.get("panels", []):
        yield panel
        yield from all_panels(panel)


def query_panels() -> list[Object]:
    return [p for p in all_panels(dashboard()) if p["type"] != "row"]


def expressions(panel: Object) -> list[str]:
    return [str(target["expr"]) for target in panel.get("targets", [])]


def queried_names() -> list[str]:
    return sorted({n for p in query_panels() for e in expressions(p) for n in METRIC.findall(e)})


# -- the server, after one call of each kind --------------------------------------------------


def money(minor_units: int) -> common_pb2.Money:
    return common_pb2.Money(currency_code=CNY, minor_units=minor_units)


def account(limit: int) -> limit_service_pb2.AccountState:
    return limit_service_pb2.AccountState(
        current_limit=money(limit),
        balance=money(200_000),
        on_time_repayments_in_row=12,
        days_past_due=0,
        account_age_days=400,
    )


def missed_payment() -> alert_service_pb2.BehaviourEvent:
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC))
    return alert_service_pb2.BehaviourEvent(
        event_id="missed-1",
        occurred_at=occurred,
        missed_payment=alert_service_pb2.MissedPayment(amount_due=money(5000), days_past_due=45),
    )


def scrape(port: int) -> dict[str, Metric]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Metric]]:
    """The families a real server serves after Score, ScoreBatch, AdjustLimit, an alert raised
    by EvaluateEvent and one refused call."""
    server = ServerProcess(
        tmp_path_factory.mktemp("metrics") / "var",
        "--metrics-port",
        "0",
        "--drift-min-count",
        "10",  # the smallest k: the drift report has something to say after a few calls
    )
    try:
        (ready,) = [r for r in server.records() if r.get("event") == "server.ready"]
        port = int(ready["metrics_port"])
        with server.channel() as channel:
            client = server.client(channel)
            for index, features in enumerate(applicants()[:30]):
                client.score("t", f"metrics-{index}", features)
            client.score_batch(
                "t", [(f"metrics-batch-{i}", f) for i, f in enumerate(applicants()[30:130])]
            )
            increase = client.adjust_limit("t", "metrics-0", account(1_000_000), latest_score=570)
            assert increase.action == limit_service_pb2.LIMIT_ACTION_INCREASE
            raised = client.evaluate_event("t", "metrics-0", missed_payment())
            assert [alert.rule for alert in raised.alerts] == ["overdue.dpd_30"]
            with pytest.raises(grpc.RpcError) as refused:
                client.adjust_limit("t", "metrics-1", account(-1), latest_score=570)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Counted when durable, which is before each reply; poll anyway, briefly.
        deadline = time.monotonic() + 10
        families = scrape(port)
        while not families["privscore_refusals"].samples and time.monotonic() < deadline:
            time.sleep(0.05)
            families = scrape(port)
        yield families
    finally:
        server.terminate()


def family_name(name: str, served: dict[str, Metric]) -> str:
    """The family a queried name belongs to, as prometheus_client's parser names it."""
    if name.endswith("_total"):
        return name.removesuffix("_total")
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in served and served[base].type in ("histogram", "summary"):
            return base
    return name


def drift_served(served: dict[str, Metric]) -> bool:
    return any(name.startswith(DRIFT) for name in served)


def served_labels(family: Metric) -> set[str]:
    return {label for sample in family.samples for label in sample.labels}


# -- tests ------------------------------------------------------------------------------------


def test_the_dashboard_is_grafana_json_reading_the_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] is True
    panels = list(all_panels(board))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] >= 1 and pos["x"] + pos["w"] <= 24, panel["title"]
        taken = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not taken & cells, f"{panel['title']} overlaps another panel"
        cells |= taken
    for panel in query_panels():
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], f"{title} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, title
            expr = target["expr"]
            selectors = list(SELECTOR.finditer(expr))
            assert selectors and len(selectors) == len(METRIC.findall(expr)), (title, expr)
            for selector in selectors:  # every series filtered by the job and instance chosen
                matchers = {m["label"]: m["value"] for m in MATCHER.finditer(selector["matchers"])}
                assert matchers.get("job") == "$job", (title, expr)
                assert matchers.get("instance") == "$instance", (title, expr)
            if "histogram_quantile" in expr:
                for grouping in GROUPING.finditer(expr):
                    assert "le" in re.split(r"\s*,\s*", grouping["labels"].strip()), (title, expr)


def test_the_drift_panels_draw_the_psi_thresholds_the_report_uses() -> None:
    psi = [p for p in query_panels() if any("privscore_drift_psi" in e for e in expressions(p))]
    windows = {m for p in psi for e in expressions(p) for m in re.findall(r'window="(\w+)"', e)}
    assert windows == {"window", "since_start"}
    for panel in psi:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps[1:]] == [PSI_WATCH, PSI_ACT], panel["title"]


@pytest.mark.parametrize("name", queried_names())
def test_every_metric_a_panel_queries_is_served(name: str, served: dict[str, Metric]) -> None:
    family = family_name(name, served)
    if name.startswith(DRIFT) and not drift_served(served):
        pytest.skip(f"{name}: {NO_DRIFT_YET}")
    assert family in served, f"{name} is on the dashboard but the server serves no {family}"
    samples = [s for s in served[family].samples if s.name == name]
    assert samples, f"{name}: the server serves {family} but no {name} sample"


@pytest.mark.parametrize("panel", query_panels(), ids=lambda p: p["title"])
def test_every_label_a_panel_names_is_served(panel: Object, served: dict[str, Metric]) -> None:
    """Matchers name labels the family has (and an `=`/`=~` value some series has); `by`,
    `without` and the legend's `{{label}}` name labels of the families queried."""
    for target in panel["targets"]:
        expr = target["expr"]
        names = METRIC.findall(expr)
        if any(n.startswith(DRIFT) for n in names) and not drift_served(served):
            pytest.skip(f"{panel['title']}: {NO_DRIFT_YET}")
        missing = {family_name(n, served) for n in names} - served.keys()
        assert not missing, f"{panel['title']}: the server serves no {sorted(missing)}"
        families = {n: served[family_name(n, served)] for n in names}
        available = SCRAPER_LABELS | {
            label for f in families.values() for label in served_labels(f)
        }
        for selector in SELECTOR.finditer(expr):
            name = selector["name"]
            samples = [s for s in families[name].samples if s.name == name]
            for matcher in MATCHER.finditer(selector["matchers"]):
                label, op, value = matcher["label"], matcher["op"], matcher["value"]
                if label in SCRAPER_LABELS:
                    continue
                assert any(label in s.labels for s in samples), f"{name} has no label {label}"
                if op in ("=", "=~") and "$" not in value:
                    pattern = re.escape(value) if op == "=" else value
                    assert any(re.fullmatch(pattern, s.labels.get(label, "")) for s in samples), (
                        f"no {name} series has {label}{op}{value!r}"
                    )
        for grouping in GROUPING.finditer(expr):
            grouped = {g for g in re.split(r"\s*,\s*", grouping["labels"].strip()) if g}
            assert grouped <= available, f"{expr}: no such label {sorted(grouped - available)}"
        legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        assert legend <= available, f"{panel['title']}: legend names {sorted(legend - available)}"


def test_every_metric_the_server_serves_is_on_the_dashboard(served: dict[str, Metric]) -> None:
    """A metric added to the server without a panel shows here."""
    shown = {family_name(name, served) for name in queried_names()}
    ours = {name for name in served if METRIC.fullmatch(name)}
    assert not ours - shown, f"served but on no panel: {sorted(ours - shown)}"


def test_the_dashboard_file_is_formatted_as_committed() -> None:
    """Two-space JSON with a final newline, so a Grafana export pasted over it shows as a diff
    of what changed, not of the formatting."""
    text = DASHBOARD.read_text()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
