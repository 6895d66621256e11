"""Prometheus metrics of a worker (names are the contract for dashboards and alert rules)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BatchHistogram:
    """A histogram observed a micro-batch at a time: one ``searchsorted`` and ``bincount`` per batch instead of
    one locked ``Histogram.observe`` per reading (with envelopes of 10 readings that was ~2.5 % of the
    worker's main thread). Exposed like a ``Histogram`` without labels: ``_bucket`` (cumulative, ``le``
    inclusive), ``_count`` and ``_sum``."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, np.float64)
        self._counts = np.zeros(len(buckets) + 1, np.int64)  # the last bin is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()  # the metrics server collects from its own thread
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], np.float64))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = self._counts.cumsum().tolist(), self._sum
        bounds = [floatToGoString(b) for b in self._bounds.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=list(zip(bounds, cumulative, strict=True)), sum_value=total
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.messages = Counter("iotad_messages_consumed", "Kafka messages consumed", registry=r)
        self.readings = Counter("iotad_readings", "Valid readings applied to a device", registry=r)
        self.scored = Counter("iotad_readings_scored", "Resampled steps scored and written", registry=r)
        self.anomalies = Counter("iotad_anomalies", "Steps flagged anomalous", registry=r)
        self.dead_letters = Counter(
            "iotad_dead_letters", "Messages or readings sent to the dead-letter topic", ["reason"], registry=r
        )
        self.late = Counter("iotad_late_readings", "Readings for an already closed bucket", registry=r)
        self.replayed = Counter(
            "iotad_replayed_skipped", "Re-consumed messages already applied to state (after a crash)", registry=r
        )
        self.refetched = Counter(
            "iotad_offsets_refetched",
            "Records the consumer skipped (offset holes after a restart or rebalance), re-read and processed",
            registry=r,
        )
        self.checkpoints = Counter(
            "iotad_device_checkpoints", "Device states written to the state changelog", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "iotad_checkpoint_seconds",
            "One checkpoint of the devices advanced within an interval: serialised, then written (in the background)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.imputed = Counter("iotad_imputed_steps", "Gap steps forward-filled", registry=r)
        self.resets = Counter("iotad_state_resets", "Device states reset after a long gap", registry=r)
        self.batch_size = Histogram(
            "iotad_batch_messages",
            "Messages per micro-batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.step_seconds = Histogram(
            "iotad_step_seconds",
            "Batched model step (all waves of a micro-batch)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = BatchHistogram(
            "iotad_end_to_end_latency_seconds",
            "Reading timestamp to score emitted on the scores topic",
            _LATENCY_BUCKETS,
            r,
        )
        self.influx_latency = BatchHistogram(
            "iotad_influx_latency_seconds",
            "Reading timestamp to its score point written in InfluxDB (written behind the scores topic)",
            _LATENCY_BUCKETS,
            r,
        )
        self.sink_pending = Gauge(
            "iotad_sink_pending_points", "Points queued or being written to InfluxDB (write-behind)", registry=r
        )
        self.sink_writes = Counter("iotad_sink_writes", "Successful sink writes", ["sink"], registry=r)
        self.sink_errors = Counter("iotad_sink_errors", "Failed sink write attempts", ["sink"], registry=r)
        self.sink_retries = Counter("iotad_sink_retries", "Sink write retries", ["sink"], registry=r)
        self.devices = Gauge("iotad_devices_tracked", "Devices with state in this worker", registry=r)
        # Staleness: alert when time() minus this grows while readings keep arriving.
        self.last_output = Gauge(
            "iotad_last_output_timestamp_seconds",
            "Wall time of the latest micro-batch whose outputs (scores, dead letters) were written",
            registry=r,
        )
        self.assigned = Gauge("iotad_assigned_partitions", "Readings partitions assigned to this worker", registry=r)
        self.model_info = Gauge("iotad_model_info", "Model version being served (value 1)", ["version"], registry=r)
        self.shadow_info = Gauge(
            "iotad_shadow_model_info", "Shadow model being compared (value 1)", ["version"], registry=r
        )
        self.model_swaps = Counter("iotad_model_swaps", "Champion models swapped in without a restart", registry=r)
        self.model_load_failures = Counter(
            "iotad_model_load_failures",
            "Artifacts refused (corrupt, wrong features); the old model kept serving",
            registry=r,
        )
        self.rewarmed = Counter(
            "iotad_rewarmed_devices", "Device states re-warmed from history for a new model", registry=r
        )
        self.drift_psi = Gauge(
            "iotad_drift_psi", "Last PSI of the forecast errors vs the reference", ["group"], registry=r
        )
        self.retrain_requests = Counter(
            "iotad_retrain_requests", "Retrain requests published on drift", ["group"], registry=r
        )
        self.rewarm_seconds = Histogram(
            "iotad_rewarm_seconds", "Re-warming time within a micro-batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "iotad_consumer_lag",
            "Messages behind the partition's high watermark (committed offset), per consumed partition",
            ["topic", "partition"],
            registry=r,
        )
        # Alerter (`iotad alerter`, pipeline/alert_agents.py)
        self.alerts_opened = Counter("iotad_alerts_opened", "Alerts opened", ["kind", "severity"], registry=r)
        self.alerts_resolved = Counter("iotad_alerts_resolved", "Alerts resolved", ["kind"], registry=r)
        self.alerts_suppressed = Counter(
            "iotad_alerts_suppressed", "Alert events withheld from receivers by the storm guard", registry=r
        )
        self.alerts_firing = Gauge("iotad_alerts_firing", "Device alerts open in this alerter", registry=r)
        self.alert_storm = Gauge(
            "iotad_alert_storm_active", "1 while an alert storm is active in the scope", ["scope"], registry=r
        )
        self.alert_deliveries = Counter(
            "iotad_alert_deliveries",
            "Alert deliveries by receiver and outcome (ok, failed = dead-lettered)",
            ["receiver", "outcome"],
            registry=r,
        )
        self.alert_retries = Counter("iotad_alert_delivery_retries", "Delivery retries", ["receiver"], registry=r)
        self.alert_dead_letters = Counter(
            "iotad_alert_dead_letters", "Records sent to <prefix>.alerts.dlq", ["reason"], registry=r
        )
        self.alert_latency = Histogram(
            "iotad_alert_delivery_latency_seconds",
            "Alert written to the outbox to accepted by a receiver",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def serve(self, host: str, port: int) -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
