"""Grafana dashboards: generated as code, valid, and every query works against what the pipeline writes.

- The committed JSON equals a fresh run of dashboards/generate.py.
- Each dashboard validates against Grafana's dashboard JSON schema (tests/deploy/grafana-dashboard.schema.json,
  generated from @grafana/schema 13.2.3; see tests/deploy/README.md).
- Every InfluxQL query (panels, template variables, annotations) runs against a real influxd holding points
  written by the pipeline's own line formatter (pipeline.records.score_line) through InfluxV1Writer, and
  returns data.
- Every PromQL expression parses (promtool) and selects only series that `iotad worker` exports
  (pipeline/metrics.py), or Prometheus' own ALERTS for the rules in deploy/rules.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from connectors.influx import InfluxV1Writer, influx_v1_query
from models.scoring import Status
from pipeline.records import ScoreRecord, score_line
from pipeline.settings import DEFAULT_MODEL_DIR, Settings
from tests.deploy.helpers import REPO, module, promql_metric_names, run, tool, worker_metric_names

DASHBOARDS = REPO / "dashboards"
SCHEMA = Path(__file__).with_name("grafana-dashboard.schema.json")
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "iotad.yml"
DATABASE = "iotad_dashboards"
MEASUREMENT = Settings.model_fields["influx_measurement"].default
DEVICES = [f"pump-{i:03d}" for i in range(6)]
STEPS = 240  # one point per device per second, ending now
INTERVAL = "10s"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    module("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("iotad_dashboards_generate", DASHBOARDS / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dashboards(generator: ModuleType) -> dict[str, dict[str, Any]]:
    return {name: json.loads((DASHBOARDS / name).read_text()) for name in generator.DASHBOARDS}


def walk_targets(dash: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, query) for every panel target, template variable and annotation of a dashboard."""
    for panel in dash.get("panels", []):
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                yield f"panel {sub['title']!r} {target.get('refId')}", {**target, "_panel": sub}
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] == "query":
            yield f"variable {var['name']}", {"datasource": var["datasource"], "query": var["query"], "rawQuery": True}
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("builtIn"):
            continue
        yield f"annotation {ann['name']!r}", ann


def is_influx(target: dict[str, Any]) -> bool:
    return target["datasource"]["type"] == "influxdb"


# --- As code, valid ----------------------------------------------------------------------------------


def test_committed_json_is_generated(generator, tmp_path):
    fresh = generator.generate()
    assert set(fresh) == {p.name for p in DASHBOARDS.glob("*.json")}, "stray or missing dashboard JSON"
    for name, text in fresh.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: python dashboards/generate.py"
    assert generator.generate() == fresh, "generator is not deterministic"
    assert generator.main(["--out", str(tmp_path)]) == 0 and generator.main(["--out", str(tmp_path), "--check"]) == 0


def test_dashboards_match_grafana_schema(dashboards):
    paths = [str(DASHBOARDS / name) for name in dashboards]
    run([tool("check-jsonschema"), "--schemafile", str(SCHEMA), *paths])


def test_datasource_uids_are_provisioned(dashboards):
    provisioned = {d["uid"]: d["type"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    for name, dash in dashboards.items():
        for where, target in walk_targets(dash):
            ds = target["datasource"]
            assert provisioned.get(ds["uid"]) == ds["type"], f"{name} {where}: unknown data source {ds}"
            if is_influx(target):
                assert target.get("rawQuery", True) and target["query"].strip(), f"{name} {where}"


def test_dashboard_contents(dashboards):
    fleet = dashboards["iotad-fleet-overview.json"]
    device = dashboards["iotad-device-drilldown.json"]
    health = dashboards["iotad-pipeline-health.json"]
    assert len({d["uid"] for d in dashboards.values()}) == 3

    fleet_types = {p["type"] for p in fleet["panels"]}
    assert {"heatmap", "timeseries", "table", "stat"} <= fleet_types
    titles = {p["title"] for p in fleet["panels"]}
    assert {"Anomalies over time", "Score by device", "Top anomalous devices"} <= titles
    annotations = {a["name"]: a for a in fleet["annotations"]["list"]}
    assert (
        "ALERTS" in annotations["Pipeline alerts"]["expr"] and "is_anomaly" in annotations["Flagged anomalies"]["query"]
    )

    variables = {v["name"]: v for v in device["templating"]["list"]}
    assert variables["device"]["type"] == "query" and 'WITH KEY = "device"' in variables["device"]["query"]
    queries = " ".join(t["query"] for _, t in walk_targets(device) if is_influx(t))
    assert "forecast_$sensor" in queries and "value_$sensor" in queries and '"threshold"' in queries
    assert re.search(r'"is_anomaly" = true', queries)
    sensors = [o.strip() for o in variables["sensor"]["query"].split(",")]
    features = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["features"]
    assert sensors == features, "the sensor variable should list the default model's features"

    exprs = " ".join(t["expr"] for _, t in walk_targets(health) if not is_influx(t))
    for needle in (
        "histogram_quantile(0.99, sum by (le) (rate(iotad_end_to_end_latency_seconds_bucket",
        "iotad_messages_consumed_total",
        "iotad_dead_letters_total",
        "iotad_sink_errors_total",
        "iotad_sink_retries_total",
        "iotad_model_info",
    ):
        assert needle in exprs, needle


# --- PromQL ------------------------------------------------------------------------------------------


def prom_exprs(dashboards: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (f"{name} {where}", t["expr"])
        for name, dash in dashboards.items()
        for where, t in walk_targets(dash)
        if not is_influx(t)
    ]


def test_promql_uses_only_exported_metrics(dashboards):
    exported = worker_metric_names()
    rules = yaml.safe_load((REPO / "deploy" / "rules" / "iotad.rules.yml").read_text())
    alert_names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    exprs = prom_exprs(dashboards)
    assert len(exprs) > 20
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        if names == {"ALERTS"}:  # Prometheus' series of the alerts defined in deploy/rules
            pattern = re.search(r'alertname=~"([^"]+)"', expr)
            assert pattern and any(re.fullmatch(pattern.group(1), a) for a in alert_names), where
            continue
        assert names <= exported, f"{where}: not exported by pipeline/metrics.py: {sorted(names - exported)}"


def test_promql_parses(dashboards, tmp_path):
    rules = [
        {
            "record": f"dashboard:expr_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$__interval", "30s"),
        }
        for i, (_, expr) in enumerate(prom_exprs(dashboards))
    ]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert "$" not in path.read_text(), "unhandled Grafana variable in a PromQL expression"
    run([tool("promtool"), "check", "rules", str(path)])


# --- InfluxQL against a real InfluxDB -------------------------------------------------------------


@pytest.fixture(scope="module")
def scores_db(influxd) -> tuple[str, int, int]:
    """Writes a fleet's scores the way the worker does; returns (url, first ms, last ms)."""
    features = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["features"]
    influxd.create_database(DATABASE)
    end = int(time.time() * 1000) // 1000 * 1000
    start = end - (STEPS - 1) * 1000
    lines = []
    for d, device in enumerate(DEVICES):
        for i in range(STEPS):
            warming = i < 30
            anomaly = not warming and i % (17 + d) == 0
            base = [50.0 + d, 3.5, 1.2, 12.0]
            values = tuple(v + 0.01 * i for v in base[: len(features)])
            record = ScoreRecord(
                device_id=device,
                ts_ms=start + i * 1000,
                status=Status.WARMING_UP if warming else Status.OK,
                score=None if i == 0 else (9.5 if anomaly else 0.5 + 0.001 * i),
                threshold=6.0,
                is_anomaly=anomaly,
                top_sensor=features[i % len(features)] if anomaly else None,
                values=values,
                forecast=None if i == 0 else tuple(v + 0.1 for v in values),
                model_version="sim-lstm-v1" if i < STEPS // 2 else "sim-lstm-v2",
                n_readings=1 + i % 3,
            )
            lines.append(score_line(record, features, MEASUREMENT))

    async def write() -> None:
        async with InfluxV1Writer(influxd.url, DATABASE) as writer:
            for k in range(0, len(lines), 500):
                await writer.write(lines[k : k + 500])

    asyncio.run(write())
    return influxd.url, start, end


def influx_queries(dashboards: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (f"{name} {where}", t["query"], t)
        for name, dash in dashboards.items()
        for where, t in walk_targets(dash)
        if is_influx(t)
    ]


def expand(query: str, start: int, end: int, device: str, sensor: str | None) -> str:
    """Grafana's macro and variable expansion for InfluxQL, for one device (and sensor)."""
    q = query.replace("$timeFilter", f"time >= {start}ms and time <= {end}ms")
    q = q.replace("$__interval", INTERVAL)
    q = q.replace("/^$device$/", "/^" + re.escape(device).replace("/", r"\/") + "$/")
    if sensor is not None:
        q = q.replace("$sensor", sensor)
    assert not re.search(r"\$\{?[A-Za-z_]", q), f"unexpanded variable in {q!r}"
    return q


def columns_without_data(series: list[dict[str, Any]]) -> set[str]:
    """Selected columns with no non-null, non-zero value in any row (fill(0) rows alone do not count).

    An empty result, or a misspelt field (a column of nulls next to a good one), both show up here.
    """
    if not series:
        return {"<no series>"}
    empty = set()
    for column in {c for s in series for c in s["columns"]} - {"time"}:
        values = [row[s["columns"].index(column)] for s in series if column in s["columns"] for row in s["values"]]
        if all(v in (None, 0, "") for v in values):
            empty.add(column)
    return empty


def test_every_influxql_query_returns_data(dashboards, scores_db):
    url, start, end = scores_db
    queries = influx_queries(dashboards)
    assert len(queries) >= 20
    sensors = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["features"]
    ran = 0
    for where, query, target in queries:
        repeat = target.get("_panel", {}).get("repeat")
        for sensor in sensors if repeat == "sensor" or "$sensor" in query else [None]:
            for device in DEVICES[:2] if "$device" in query else DEVICES[:1]:
                q = expand(query, start, end, device, sensor)
                series = influx_v1_query(url, DATABASE, q)
                empty = columns_without_data(series)
                assert not empty, f"{where} ({device}, {sensor}): no data in {sorted(empty)} for\n{q}\n{series}"
                ran += 1
    assert ran >= len(queries)


def test_queries_see_what_the_pipeline_wrote(dashboards, scores_db):
    """Spot checks of query semantics against the known data set."""
    url, start, end = scores_db
    panels = {(p["title"], p["type"]): p for d in dashboards.values() for p in d["panels"] if p.get("targets")}

    def rows(title: str, kind: str, device: str = DEVICES[0]) -> list[Any]:
        q = expand(panels[title, kind]["targets"][0]["query"], start, end, device, None)
        return [row for s in influx_v1_query(url, DATABASE, q) for row in s["values"]]

    anomalies = {d: sum(1 for i in range(30, STEPS) if i % (17 + k) == 0) for k, d in enumerate(DEVICES)}
    assert rows("Devices reporting", "stat")[0][1] == len(DEVICES)
    assert rows("Scored steps", "stat")[0][1] == len(DEVICES) * STEPS
    assert rows("Anomalies", "stat")[0][1] == sum(anomalies.values())
    assert rows("Devices with anomalies", "stat")[0][1] == len(DEVICES)
    top = rows("Top anomalous devices", "table")
    assert sorted((row[2], row[1]) for row in top) == sorted(anomalies.items())
    assert rows("Status", "stat", DEVICES[1])[0][1] == "ok"
    assert rows("Flagged steps", "stat", DEVICES[1])[0][1] == anomalies[DEVICES[1]]
    assert len(rows("Flagged steps", "table", DEVICES[1])) == anomalies[DEVICES[1]]
    assert [row[1] for row in rows("Model version", "stat")] == [6.0, 6.0]  # one series per model version
