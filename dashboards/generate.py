"""Generate iotad's Grafana dashboards as code (grafana-foundation-sdk) and write them as JSON.

    python dashboards/generate.py            # (re)write dashboards/*.json
    python dashboards/generate.py --check    # exit 1 if a committed JSON file differs from the code

The output is deterministic (fixed uids and panel ids, sorted keys), so the committed JSON can be
compared with a fresh generation (tests/deploy/test_dashboards.py does). Grafana provisions the files
from this directory (deploy/grafana/provisioning/dashboards/iotad.yml); change this script, not the UI.

Data sources (uids fixed by deploy/grafana/provisioning/datasources/iotad.yml):
- ``iotad-influxdb``: InfluxDB queried with InfluxQL. The worker writes one point per scored step to the
  measurement ``anomaly_scores`` (pipeline/records.py): tags ``device``, ``model_version``; fields
  ``score``, ``threshold``, ``is_anomaly``, ``status``, ``top_sensor``, ``n_readings``,
  ``value_<sensor>``, ``forecast_<sensor>``.
- ``iotad-prometheus``: the worker's metrics (pipeline/metrics.py). Counters carry a ``_total`` suffix.
  The worker exports no Kafka consumer lag, so no panel shows it (see the pipeline-health dashboard).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm
from grafana_foundation_sdk.models import text as tm

OUT_DIR = Path(__file__).resolve().parent

INFLUX_UID = "iotad-influxdb"
PROM_UID = "iotad-prometheus"
INFLUX = dm.DataSourceRef(type_val="influxdb", uid=INFLUX_UID)
PROM = dm.DataSourceRef(type_val="prometheus", uid=PROM_UID)

MEASUREMENT = "anomaly_scores"
# The default model's features (models/default/model.json); the drill-down's `sensor` variable lists them.
SENSORS = ("temp", "pressure", "vibration", "current")
WORKER_JOB = "iotad-worker"

FLEET_UID = "iotad-fleet"
DEVICE_UID = "iotad-device"
HEALTH_UID = "iotad-pipeline"
TAGS = ["iotad"]

FROM = f'FROM "{MEASUREMENT}"'
DEVICE_FILTER = '"device" =~ /^$device$/'
ANOMALY_FILTER = '"is_anomaly" = true'
RATE = "$__rate_interval"


# --- Queries -------------------------------------------------------------------------------------


@dataclass
class InfluxQLQuery(cogvariants.Dataquery):
    """A raw InfluxQL target (the SDK has no InfluxDB query type)."""

    ref_id: str
    query: str
    alias: str | None = None
    result_format: Literal["time_series", "table"] = "time_series"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": INFLUX.to_json(),
            "rawQuery": True,
            "query": self.query,
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(
        self,
        query: str,
        ref_id: str = "A",
        *,
        alias: str | None = None,
        fmt: Literal["time_series", "table"] = "time_series",
    ) -> None:
        self._q = InfluxQLQuery(ref_id, query, alias, fmt)

    def build(self) -> InfluxQLQuery:
        return self._q


def promql(expr: str, legend: str = "", ref_id: str = "A", *, instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(PROM)
    if legend:
        q = q.legend_format(legend)
    return q.instant() if instant else q.range()


@dataclass
class RawAnnotation:
    """An annotation query the SDK cannot express (InfluxQL columns, Prometheus title/text formats)."""

    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.body


class Annotation(cogbuilder.Builder[dm.AnnotationQuery]):
    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body

    def build(self) -> dm.AnnotationQuery:
        return RawAnnotation(self._body)  # type: ignore[return-value]  # serialised through to_json


def builtin_annotation() -> Annotation:
    return Annotation(
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }
    )


def alerts_annotation() -> Annotation:
    """Firing pipeline alerts (Prometheus' own ALERTS series for the rules in deploy/rules)."""
    return Annotation(
        {
            "datasource": PROM.to_json(),
            "enable": True,
            "iconColor": "orange",
            "name": "Pipeline alerts",
            "expr": 'ALERTS{alertstate="firing", alertname=~"Iotad.*"}',
            "step": "60s",
            "titleFormat": "{{alertname}}",
            "textFormat": "{{severity}} {{sink}}{{reason}}{{version}}",
            "tagKeys": "alertname,severity",
            "useValueForTime": False,
        }
    )


def anomalies_annotation(query: str, name: str) -> Annotation:
    return Annotation(
        {
            "datasource": INFLUX.to_json(),
            "enable": True,
            "iconColor": "red",
            "name": name,
            "query": query,
            "textColumn": "top_sensor",
            "tagsColumn": "device",
        }
    )


# --- Panels --------------------------------------------------------------------------------------


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def legend(*, table_mode: bool = False, calcs: list[str] | None = None) -> cb.VizLegendOptions:
    lg = (
        cb.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.TABLE if table_mode else common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
    )
    return lg.calcs(calcs) if calcs else lg


def tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def ts_panel(title: str, desc: str, *, unit: str = "short", w: int = 12, h: int = 8) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(desc)
        .unit(unit)
        .span(w)
        .height(h)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(legend())
        .tooltip(tooltip())
    )


def stat_panel(title: str, desc: str, *, unit: str = "short", w: int = 4, h: int = 4) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(desc)
        .unit(unit)
        .span(w)
        .height(h)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def points_override(name: str, color: str) -> list[dm.DynamicConfigValue]:
    return [
        dm.DynamicConfigValue(id_val="custom.drawStyle", value="points"),
        dm.DynamicConfigValue(id_val="custom.pointSize", value=9),
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
    ]


def fixed_color(color: str) -> list[dm.DynamicConfigValue]:
    return [dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]


def dashboard_links() -> list[cogbuilder.Builder[dm.DashboardLink]]:
    return [
        db.DashboardLink("iotad")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(True)
        .include_vars(False)
        .keep_time(True)
    ]


def base_dashboard(uid: str, title: str, desc: str, refresh: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(desc)
        .tags(TAGS)
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh(refresh)
        .timezone("browser")
        .links(dashboard_links())
    )


# --- (1) Fleet overview --------------------------------------------------------------------------


def fleet_overview() -> db.Dashboard:
    d = base_dashboard(
        FLEET_UID,
        "iotad / Fleet overview",
        "All devices: scored steps, flagged anomalies, score heatmap and the most anomalous devices "
        f"(InfluxDB measurement {MEASUREMENT}). Red marks: flagged steps; orange: firing pipeline alerts.",
        "30s",
    )
    d = d.annotation(builtin_annotation())
    d = d.annotation(
        anomalies_annotation(
            f'SELECT "score", "top_sensor", "device" {FROM} WHERE {ANOMALY_FILTER} AND $timeFilter LIMIT 500',
            "Flagged anomalies",
        )
    )
    d = d.annotation(alerts_annotation())

    d = d.with_row(db.Row("Fleet"))
    d = d.with_panel(
        stat_panel("Devices reporting", "Devices with at least one scored step in the time range.")
        .with_target(
            InfluxQL(f'SELECT count("last") FROM (SELECT last("threshold") {FROM} WHERE $timeFilter GROUP BY "device")')
        )
        .thresholds(thresholds((None, "blue")))
    )
    d = d.with_panel(
        stat_panel("Scored steps", "Steps scored and written (all devices) in the time range.")
        .with_target(InfluxQL(f'SELECT count("threshold") {FROM} WHERE $timeFilter'))
        .thresholds(thresholds((None, "blue")))
    )
    d = d.with_panel(
        stat_panel("Anomalies", "Steps flagged anomalous (score above threshold) in the time range.")
        .with_target(InfluxQL(f'SELECT count("threshold") {FROM} WHERE {ANOMALY_FILTER} AND $timeFilter'))
        .no_value("0")
        .thresholds(thresholds((None, "green"), (1, "red")))
    )
    d = d.with_panel(
        stat_panel("Devices with anomalies", "Devices with at least one flagged step in the time range.")
        .with_target(
            InfluxQL(
                f'SELECT count("last") FROM (SELECT last("score") {FROM} '
                f'WHERE {ANOMALY_FILTER} AND $timeFilter GROUP BY "device")'
            )
        )
        .no_value("0")
        .thresholds(thresholds((None, "green"), (1, "orange")))
    )
    d = d.with_panel(
        stat_panel("Highest score", "Largest normalised score of any device in the time range.", w=8)
        .with_target(InfluxQL(f'SELECT max("score") {FROM} WHERE $timeFilter'))
        .decimals(2)
        .thresholds(thresholds((None, "green"), (6, "red")))
    )

    d = d.with_panel(
        ts_panel("Anomalies over time", "Flagged steps per interval, all devices.", w=24, h=7)
        .with_target(
            InfluxQL(
                f'SELECT count("threshold") AS "anomalies" {FROM} '
                f"WHERE {ANOMALY_FILTER} AND $timeFilter GROUP BY time($__interval) fill(0)"
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.FIXED).fixed_color("red"))
    )
    d = d.with_panel(
        heatmap.Panel()
        .title("Score by device")
        .description("Highest score per device and interval (rows: devices). Bright cells are anomalous steps.")
        .span(24)
        .height(12)
        .with_target(
            InfluxQL(
                f'SELECT max("score") {FROM} WHERE $timeFilter GROUP BY time($__interval), "device" fill(none)',
                alias="$tag_device",
            )
        )
        .with_transformation(
            dm.DataTransformerConfig(id_val="joinByField", options={"byField": "Time", "mode": "outer"})
        )
        .calculate(False)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .fill("dark-orange")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .min(0)
        )
        .y_axis(heatmap.YAxisConfig().axis_placement(common.AxisPlacement.LEFT))
        .cell_gap(1)
        .show_legend()
        .show_tooltip()
    )
    d = d.with_panel(
        table.Panel()
        .title("Top anomalous devices")
        .description("The 10 devices with the most flagged steps in the time range. Click a device to drill down.")
        .span(10)
        .height(10)
        .with_target(
            InfluxQL(
                'SELECT top("anomalies", "device", 10) AS "anomalies" FROM '
                f'(SELECT count("threshold") AS "anomalies" {FROM} '
                f'WHERE {ANOMALY_FILTER} AND $timeFilter GROUP BY "device")',
                fmt="table",
            )
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "indexByName": {"device": 0, "anomalies": 1}},
            )
        )
        .sort_by([cb.TableSortByFieldState().display_name("anomalies").desc(True)])
        .override_by_name(
            "device",
            [
                dm.DynamicConfigValue(
                    id_val="links",
                    value=[
                        {
                            "title": "Device drill-down",
                            "url": f"/d/{DEVICE_UID}?var-device=${{__value.raw}}&${{__url_time_range}}",
                        }
                    ],
                )
            ],
        )
    )
    d = d.with_panel(
        table.Panel()
        .title("Latest anomalies")
        .description("Most recent flagged steps: device, score, threshold and the sensor that contributed most.")
        .span(14)
        .height(10)
        .with_target(
            InfluxQL(
                f'SELECT "device", "score", "threshold", "top_sensor", "model_version" {FROM} '
                f"WHERE {ANOMALY_FILTER} AND $timeFilter ORDER BY time DESC LIMIT 100",
                fmt="table",
            )
        )
        .decimals(2)
    )
    return d


# --- (2) Device drill-down -----------------------------------------------------------------------


def device_drilldown() -> db.Dashboard:
    d = base_dashboard(
        DEVICE_UID,
        "iotad / Device drill-down",
        "One device: each sensor with the model's forecast, the score against its threshold and the flagged steps. "
        "The sensor list is the default model's features; edit the `sensor` variable for another model.",
        "30s",
    )
    d = d.with_variable(
        db.QueryVariable("device")
        .label("Device")
        .datasource(INFLUX)
        .query(f'SHOW TAG VALUES FROM "{MEASUREMENT}" WITH KEY = "device"')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        .multi(False)
        .include_all(False)
    )
    d = d.with_variable(
        db.CustomVariable("sensor")
        .label("Sensors")
        .values(",".join(SENSORS))
        .multi(True)
        .include_all(True)
        .current(dm.VariableOption(text="All", value="$__all", selected=True))
    )
    d = d.annotation(builtin_annotation())
    d = d.annotation(
        anomalies_annotation(
            f'SELECT "score", "top_sensor", "device" {FROM} WHERE {DEVICE_FILTER} AND {ANOMALY_FILTER} AND $timeFilter',
            "Flagged steps",
        )
    )

    where = f"WHERE {DEVICE_FILTER} AND $timeFilter"
    d = d.with_row(db.Row("$device"))
    d = d.with_panel(
        stat_panel("Status", "warming_up until the device has enough steps to be flagged, then ok.")
        .with_target(InfluxQL(f'SELECT last("status") {FROM} {where}'))
        .text_mode(common.BigValueTextMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("/.*/"))
        .color_mode(common.BigValueColorMode.NONE)
    )
    d = d.with_panel(
        stat_panel("Last score", "Latest normalised score (forecast error).")
        .with_target(InfluxQL(f'SELECT last("score") {FROM} {where}'))
        .decimals(2)
        .thresholds(thresholds((None, "green"), (6, "red")))
    )
    d = d.with_panel(
        stat_panel("Threshold", "Latest threshold the score is compared with.")
        .with_target(InfluxQL(f'SELECT last("threshold") {FROM} {where}'))
        .decimals(2)
        .thresholds(thresholds((None, "blue")))
    )
    d = d.with_panel(
        stat_panel("Flagged steps", "Steps of this device flagged anomalous in the time range.")
        .with_target(
            InfluxQL(f'SELECT count("threshold") {FROM} WHERE {DEVICE_FILTER} AND {ANOMALY_FILTER} AND $timeFilter')
        )
        .no_value("0")
        .thresholds(thresholds((None, "green"), (1, "red")))
    )
    d = d.with_panel(
        stat_panel("Model version", "Model version that scored the latest step.", w=8)
        .with_target(
            InfluxQL(f'SELECT last("threshold") {FROM} {where} GROUP BY "model_version"', alias="$tag_model_version")
        )
        .text_mode(common.BigValueTextMode.NAME)
        .color_mode(common.BigValueColorMode.NONE)
    )
    d = d.with_panel(
        ts_panel(
            "Score vs threshold", "Score (mean per interval), threshold, and flagged steps (red points).", w=24, h=9
        )
        .with_target(
            InfluxQL(
                f'SELECT mean("score") AS "score", mean("threshold") AS "threshold" {FROM} {where} '
                "GROUP BY time($__interval) fill(none)"
            )
        )
        .with_target(
            InfluxQL(
                f'SELECT max("score") AS "flagged" {FROM} WHERE {DEVICE_FILTER} AND {ANOMALY_FILTER} AND $timeFilter '
                "GROUP BY time($__interval) fill(none)",
                ref_id="B",
            )
        )
        .override_by_name(
            "threshold",
            [*fixed_color("orange"), dm.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})],
        )
        .override_by_name("flagged", points_override("flagged", "red"))
        .override_by_name("score", fixed_color("blue"))
    )
    d = d.with_row(db.Row("Sensors"))
    d = d.with_panel(
        ts_panel("$sensor: value and forecast", "Resampled sensor value and the model's one-step forecast.", w=12, h=8)
        .repeat("sensor")
        .repeat_direction("h")
        .with_target(
            InfluxQL(
                f'SELECT mean("value_$sensor") AS "value", mean("forecast_$sensor") AS "forecast" {FROM} {where} '
                "GROUP BY time($__interval) fill(none)"
            )
        )
        .override_by_name("forecast", [dm.DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [4, 4]})])
    )
    d = d.with_row(db.Row("Steps"))
    d = d.with_panel(
        ts_panel(
            "Readings per step", "Raw readings that fell in each resampled step (0 = forward-filled gap).", w=8, h=7
        ).with_target(
            InfluxQL(f'SELECT mean("n_readings") AS "readings" {FROM} {where} GROUP BY time($__interval) fill(none)')
        )
    )
    d = d.with_panel(
        table.Panel()
        .title("Flagged steps")
        .description("Every flagged step of this device in the time range, newest first.")
        .span(16)
        .height(7)
        .with_target(
            InfluxQL(
                f'SELECT "score", "threshold", "top_sensor", "n_readings", "model_version" {FROM} '
                f"WHERE {DEVICE_FILTER} AND {ANOMALY_FILTER} AND $timeFilter ORDER BY time DESC LIMIT 500",
                fmt="table",
            )
        )
        .decimals(2)
    )
    return d


# --- (3) Pipeline health -------------------------------------------------------------------------


def pipeline_health() -> db.Dashboard:
    d = base_dashboard(
        HEALTH_UID,
        "iotad / Pipeline health",
        "The scoring workers' Prometheus metrics (pipeline/metrics.py): throughput, end-to-end latency, dead "
        "letters, sink errors and retries, model versions. Kafka consumer lag is not exported by the worker; "
        "see the note panel.",
        "30s",
    )
    d = d.annotation(builtin_annotation())
    d = d.annotation(alerts_annotation())
    d = d.annotation(
        Annotation(
            {
                "datasource": PROM.to_json(),
                "enable": True,
                "iconColor": "purple",
                "name": "Model rollouts",
                "expr": "count by (version) (iotad_model_info) unless count by (version) (iotad_model_info offset 10m)",
                "step": "60s",
                "titleFormat": "Model {{version}} rolled out",
                "textFormat": "A worker started serving model {{version}} (retrain or restart)",
                "tagKeys": "version",
            }
        )
    )

    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(
        stat_panel("Workers reporting", "Workers exporting iotad_model_info (one series per worker).")
        .with_target(promql("count(iotad_model_info)", instant=True))
        .no_value("0")
        .thresholds(thresholds((None, "red"), (1, "green")))
    )
    d = d.with_panel(
        stat_panel("Messages / s", "Kafka messages consumed per second, all workers.", unit="cps")
        .with_target(promql(f"sum(rate(iotad_messages_consumed_total[{RATE}]))", instant=True))
        .thresholds(thresholds((None, "blue")))
    )
    d = d.with_panel(
        stat_panel("Scored steps / s", "Resampled steps scored and written per second.", unit="cps")
        .with_target(promql(f"sum(rate(iotad_readings_scored_total[{RATE}]))", instant=True))
        .thresholds(thresholds((None, "red"), (0.001, "green")))
    )
    d = d.with_panel(
        stat_panel("p99 end-to-end latency", "Reading timestamp to score written, 99th percentile.", unit="s")
        .with_target(
            promql(
                f"histogram_quantile(0.99, sum by (le) (rate(iotad_end_to_end_latency_seconds_bucket[{RATE}])))",
                instant=True,
            )
        )
        .decimals(2)
        .thresholds(thresholds((None, "green"), (5, "orange"), (10, "red")))
    )
    d = d.with_panel(
        stat_panel("Dead letters / s", "Messages or readings sent to the dead-letter topic per second.", unit="cps")
        .with_target(promql(f"sum(rate(iotad_dead_letters_total[{RATE}]))", instant=True))
        .no_value("0")
        .thresholds(thresholds((None, "green"), (0.1, "orange")))
    )
    d = d.with_panel(
        stat_panel("Devices tracked", "Devices with state in the workers.")
        .with_target(promql("sum(iotad_devices_tracked)", instant=True))
        .thresholds(thresholds((None, "blue")))
    )

    d = d.with_row(db.Row("Throughput and latency"))
    d = d.with_panel(
        ts_panel(
            "Throughput",
            "Per second, all workers: Kafka messages, valid readings, scored steps, anomalies.",
            unit="cps",
        )
        .with_target(promql(f"sum(rate(iotad_messages_consumed_total[{RATE}]))", "messages", "A"))
        .with_target(promql(f"sum(rate(iotad_readings_total[{RATE}]))", "readings", "B"))
        .with_target(promql(f"sum(rate(iotad_readings_scored_total[{RATE}]))", "scored steps", "C"))
        .with_target(promql(f"sum(rate(iotad_anomalies_total[{RATE}]))", "anomalies", "D"))
        .override_by_name("anomalies", fixed_color("red"))
    )
    latency = "iotad_end_to_end_latency_seconds_bucket"
    d = d.with_panel(
        ts_panel(
            "End-to-end latency",
            "Reading timestamp to score on the scores topic (p50/p90/p99) and to its point written in InfluxDB,"
            " behind the scores (p99 InfluxDB): percentiles over all workers.",
            unit="s",
        )
        .with_target(promql(f"histogram_quantile(0.5, sum by (le) (rate({latency}[{RATE}])))", "p50", "A"))
        .with_target(promql(f"histogram_quantile(0.9, sum by (le) (rate({latency}[{RATE}])))", "p90", "B"))
        .with_target(promql(f"histogram_quantile(0.99, sum by (le) (rate({latency}[{RATE}])))", "p99", "C"))
        .with_target(
            promql(
                f"histogram_quantile(0.99, sum by (le) (rate(iotad_influx_latency_seconds_bucket[{RATE}])))",
                "p99 InfluxDB",
                "D",
            )
        )
    )
    d = d.with_panel(
        ts_panel("Model step duration", "Batched model step (all waves of a micro-batch), per worker.", unit="s")
        .with_target(
            promql(
                f"histogram_quantile(0.5, sum by (le, instance) (rate(iotad_step_seconds_bucket[{RATE}])))",
                "p50 {{instance}}",
                "A",
            )
        )
        .with_target(
            promql(
                f"histogram_quantile(0.99, sum by (le, instance) (rate(iotad_step_seconds_bucket[{RATE}])))",
                "p99 {{instance}}",
                "B",
            )
        )
    )
    d = d.with_panel(
        ts_panel("Micro-batch size", "Mean Kafka messages per micro-batch, per worker.").with_target(
            promql(
                f"sum by (instance) (rate(iotad_batch_messages_sum[{RATE}])) "
                f"/ sum by (instance) (rate(iotad_batch_messages_count[{RATE}]))",
                "{{instance}}",
            )
        )
    )

    d = d.with_row(db.Row("Errors"))
    d = d.with_panel(
        ts_panel(
            "Dead letters by reason",
            "Per second; the messages are on <prefix>.dlq with an iotad-reason header.",
            unit="cps",
        )
        .with_target(promql(f"sum by (reason) (rate(iotad_dead_letters_total[{RATE}]))", "{{reason}}"))
        .draw_style(common.GraphDrawStyle.BARS)
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    )
    d = d.with_panel(
        ts_panel("Sink writes, errors and retries", "Per second, by sink (InfluxDB).", unit="cps")
        .with_target(promql(f"sum by (sink) (rate(iotad_sink_writes_total[{RATE}]))", "writes {{sink}}", "A"))
        .with_target(promql(f"sum by (sink) (rate(iotad_sink_errors_total[{RATE}]))", "errors {{sink}}", "B"))
        .with_target(promql(f"sum by (sink) (rate(iotad_sink_retries_total[{RATE}]))", "retries {{sink}}", "C"))
        .override_by_regexp("errors.*", fixed_color("red"))
        .override_by_regexp("retries.*", fixed_color("orange"))
    )
    d = d.with_panel(
        ts_panel(
            "Data quality",
            "Per second: late readings (bucket already closed), re-consumed messages skipped after a restart, "
            "forward-filled gap steps, device states reset after a long gap, readings the consumer skipped "
            "after a restart or rebalance and the worker re-read (offset holes).",
            unit="cps",
            w=24,
        )
        .with_target(promql(f"sum(rate(iotad_late_readings_total[{RATE}]))", "late readings", "A"))
        .with_target(promql(f"sum(rate(iotad_replayed_skipped_total[{RATE}]))", "replayed, skipped", "B"))
        .with_target(promql(f"sum(rate(iotad_imputed_steps_total[{RATE}]))", "imputed steps", "C"))
        .with_target(promql(f"sum(rate(iotad_state_resets_total[{RATE}]))", "state resets", "D"))
        .with_target(promql(f"sum(rate(iotad_offsets_refetched_total[{RATE}]))", "offset holes re-read", "E"))
    )

    d = d.with_row(db.Row("Workers and model"))
    d = d.with_panel(
        ts_panel(
            "Partitions and devices per worker", "Readings partitions assigned and devices tracked, per worker.", w=8
        )
        .with_target(promql("sum by (instance) (iotad_assigned_partitions)", "partitions {{instance}}", "A"))
        .with_target(promql("sum by (instance) (iotad_devices_tracked)", "devices {{instance}}", "B"))
    )
    d = d.with_panel(
        ts_panel(
            "Workers per model version",
            "Workers serving each model version. A new line is a rollout: a retrained model picked up by the workers.",
            w=8,
        )
        .with_target(promql("count by (version) (iotad_model_info)", "{{version}}"))
        .draw_style(common.GraphDrawStyle.LINE)
    )
    d = d.with_panel(
        table.Panel()
        .title("Model version per worker")
        .description("iotad_model_info: the model version each worker serves now.")
        .span(8)
        .height(8)
        .with_target(
            promql("max by (instance, version) (iotad_model_info)", instant=True).format(pm.PromQueryFormat.TABLE)
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "Value": True}, "indexByName": {"instance": 0, "version": 1}},
            )
        )
    )
    d = d.with_panel(
        text.Panel()
        .title("Consumer lag")
        .span(24)
        .height(3)
        .mode(tm.TextMode.MARKDOWN)
        .content(
            "**Kafka consumer lag is not exported by `iotad worker`.** In Kubernetes, KEDA reads the lag of the "
            "consumer group from Kafka to scale the workers (k8s/). To chart and alert on it, run a Kafka exporter "
            "(`kafka_consumergroup_lag`) or add a lag gauge to pipeline/metrics.py."
        )
    )
    return d


# --- Output --------------------------------------------------------------------------------------

DASHBOARDS = {
    "iotad-fleet-overview.json": fleet_overview,
    "iotad-device-drilldown.json": device_drilldown,
    "iotad-pipeline-health.json": pipeline_health,
}


def _finish_panels(panels: list[dict[str, Any]]) -> None:
    """Stable panel ids, and what the SDK's panel model lacks: two repeated panels per row."""
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
        if panel.get("repeat") and panel.get("repeatDirection") == "h":
            panel["maxPerRow"] = 2


def _clean(value: Any) -> Any:
    """Drop the SDK's ``"options": null`` (rows and panels without options); the dashboard schema rejects it."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not (k == "options" and v is None)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def render(build: Any) -> str:
    raw = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    raw = _clean(raw)
    _finish_panels(raw.get("panels", []))
    return json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: render(build) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="Directory to write the JSON files to")
    parser.add_argument("--check", action="store_true", help="Only compare with the files in --out")
    args = parser.parse_args(argv)
    stale = []
    for name, content in generate().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(name)
        else:
            path.write_text(content)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python dashboards/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
