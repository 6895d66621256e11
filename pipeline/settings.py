"""All runtime settings in one place.

Every field is read from an environment variable with the ``IOTAD_`` prefix (``IOTAD_STEP_MS=500``)
or from a ``.env`` file in the working directory. Settings are loaded once at start-up and passed
down; no other module reads the environment.

Any setting can also come from a file, ``IOTAD_<NAME>_FILE=/run/secrets/...`` (pipeline/settings_files.py).
Secrets are ``SecretStr``: printing or logging the settings shows ``**********``; unwrap them only where
they are sent (``.get_secret_value()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connectors.kafka_batches import Compression
from models import DEFAULT_MODEL_DIR
from pipeline.settings_files import ValueFileSettingsSource


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTAD_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated")
    topic_prefix: str = Field("iotad", description="Topics are <prefix>.readings, .scores, .dlq")
    partitions: int = Field(4, description="Partitions of the readings topic (and the state changelog)")
    app_id: str = Field("iotad-worker", description="Faust app id = consumer group id")
    broker_session_timeout_s: float = Field(6.0, description="Kafka consumer session timeout")
    # Kafka security (connectors/kafka_security.py builds every client's settings from these)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols)"
    )
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (secret)")
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) for the brokers' certificates; none = system CAs"
    )
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client private key (PEM, unencrypted) for mutual TLS")
    kafka_ssl_check_hostname: bool = Field(True, description="Check the broker certificate's host name")

    # Windowing
    step_ms: int = Field(1000, description="Model step: readings are resampled to this period")
    grace_ms: int = Field(0, description="How long a resample bucket stays open after its end")
    idle_flush_ms: int = Field(2000, description="Close an open bucket after this much wall time without data")
    max_gap_steps: int = Field(10, description="Gaps up to this many steps are forward-filled; longer reset state")
    max_future_skew_ms: int = Field(300_000, description="Readings further in the future are rejected")
    min_timestamp_ms: int = Field(946_684_800_000, description="Readings older than this are rejected")

    dlq_compression: Compression = Field(
        "lz4",
        description="Record-batch compression of the dead-letter topic (bad input can be huge and repetitive; "
        "a large value or key that does not compress goes uncompressed)",
    )
    kafka_fetch_max_wait_ms: int = Field(
        20, ge=1, description="Longest the broker may hold a worker's fetch when no data is waiting"
    )

    # Batching
    batch_max: int = Field(2000, description="Most messages in one micro-batch")
    batch_within_s: float = Field(0.02, description="Longest wait to fill a micro-batch")
    checkpoint_interval_s: float = Field(
        3.0,
        ge=0,
        description="Checkpoint each device state a worker advanced about this often, a sixth of the dirty "
        "devices every sixth of it (0 = after every micro-batch); offsets are committed only once "
        "checkpointed, so a crash replays at most this much and a sixth",
    )

    # Model and scoring
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Directory holding the model artifact")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device; auto = cuda if present")
    torch_threads: int = Field(
        1, ge=1, description="torch CPU threads per process (scale with worker processes, one per core)"
    )
    warmup_steps: int = Field(30, description="Steps a device is 'warming_up' before it can be flagged")
    threshold_method: Literal["static", "adaptive", "likelihood", "ensemble"] = Field(
        "static",
        description="Thresholding method (ensemble: the likelihood ensemble of `iotad evaluate nab`, "
        "with hour-of-week profiles)",
    )
    threshold: float = Field(5.0, description="Static threshold on the normalised score")
    likelihood_threshold: float = Field(
        0.5,
        description="likelihood/ensemble methods: bound on the log anomaly likelihood (0.5 = tail probability 1e-5)",
    )
    adaptive_quantile: float = Field(0.999, description="Quantile tracked by the adaptive threshold")
    adaptive_margin: float = Field(1.5, description="Adaptive threshold = margin x tracked quantile")
    learn_from_anomalies: bool = Field(False, description="Let flagged steps update the error statistics")
    error_halflife_steps: float = Field(200.0, description="Half-life of the per-device error statistics")
    burnin_steps: int = Field(5, description="Forecasts right after a (re)start of a device's state not learnt from")

    history_steps: int = Field(48, ge=0, description="Recent steps kept per device to re-warm a new model's state")
    shadow_model_dir: Path | None = Field(None, description="A candidate artifact scored beside the champion")

    drift_bound: float = Field(
        0.25, ge=0, description="PSI of the forecast-error distribution that requests a retrain (0 = off)"
    )
    drift_reference: int = Field(2000, ge=10, description="Errors per device group forming the drift reference")
    drift_window: int = Field(2000, ge=10, description="Recent errors per group compared with the reference")
    drift_min_interval_s: float = Field(
        3600.0, ge=0, description="At most one drift retrain request per group per interval"
    )
    device_group_pattern: str = Field(
        "", description="Regex giving a device's group from its id (drift); '' = one group"
    )

    # InfluxDB
    influx_url: str = Field("http://127.0.0.1:8086", description="InfluxDB base URL")
    influx_version: int = Field(1, ge=1, le=2, description="1 = v1 /write API; 2 = v2/v3 API via influxdb-client")
    influx_database: str = Field("iotad", description="v1 database (v2: bucket)")
    influx_org: str = Field("iotad", description="v2 organisation")
    influx_token: SecretStr = Field(SecretStr(""), description="v2 token; v1: sent as 'Authorization: Token' (secret)")
    influx_measurement: str = Field("anomaly_scores", description="Measurement the scores are written to")
    influx_max_pending_lines: int = Field(
        50_000,
        ge=1,
        description="Points queued or being written to InfluxDB behind the scores; when full, consumption waits",
    )

    # Observability
    metrics_port: int = Field(9464, description="Prometheus metrics port on 127.0.0.1 (0 = off)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds")
    log_level: str = Field("INFO", description="Log level")

    # Local stack
    data_dir: Path = Field(Path(".iotad"), description="Where the local stack keeps its data and logs")

    # Model registry and retraining (`iotad model ...`, `iotad retrain`; see models/registry.py)
    registry_url: str = Field(
        "",
        description="Model registry: a local directory or an fsspec URL (s3://bucket/prefix); '' = <data_dir>/registry",
    )
    control_topic_suffix: str = Field(
        "control", description="Control topic <prefix>.<suffix>: model-updated and retrain-request messages"
    )
    retrain_history_hours: float = Field(24.0, gt=0, description="Retraining reads this many hours of scored steps")
    retrain_margin: float = Field(
        0.02, ge=0, lt=1, description="Promote only if candidate MSE <= champion MSE x (1 - margin)"
    )
    retrain_min_points: int = Field(2000, ge=1, description="Fewer usable points in the window: no retraining")
    retrain_min_device_points: int = Field(
        100, ge=20, description="Contiguous runs shorter than this many steps are left out of retraining"
    )
    retrain_max_devices: int = Field(100, ge=1, description="Retrain on at most this many devices (most data first)")
    retrain_interval_s: float = Field(3600.0, gt=0, description="Seconds between runs of `iotad retrain --loop`")
    retrain_max_epochs: int = Field(30, ge=1, description="Training epochs at most (early stopping may end sooner)")
    retrain_max_batches: int = Field(200, ge=0, description="Optimiser steps per epoch at most (0 = no cap)")
    retrain_seed: int = Field(0, description="Seed of the retraining run (same data + seed = same weights)")

    # Alerting (`iotad alerter`; see ALERTING.md)
    alert_app_id: str = Field("iotad-alerter", description="Faust app id = consumer group of the alerter")
    alert_metrics_port: int = Field(9465, description="Prometheus metrics port of the alerter (0 = off)")
    alert_open_steps: int = Field(3, ge=1, description="Consecutive anomalous steps that open an alert")
    alert_resolve_steps: int = Field(5, ge=1, description="Consecutive normal steps that resolve an open alert")
    alert_cooldown_ms: int = Field(
        60_000, ge=0, description="After a resolve, no new alert for the device for this long"
    )
    alert_severity_bands: str = Field(
        "critical:3,major:2,warning:1", description="Severity by peak score/threshold ratio: name:min_ratio,..."
    )
    alert_top_sensors: int = Field(3, ge=1, description="Top contributing sensors listed in an alert")
    alert_grafana_url: str = Field(
        "",
        description="Link template: {device} {group} {dedup_key} {from_ms} {to_ms}, e.g. "
        "http://grafana:3000/d/iotad-device/device?var-device={device}&from={from_ms}&to={to_ms}",
    )
    alert_group_pattern: str = Field(
        "", description="Regex giving a device's group from its id (named group 'group' or group 1); '' = one group"
    )
    alert_storm_share: float = Field(
        0.2, ge=0, le=1, description="Storm when more than this share of active devices alerts (0 = off)"
    )
    alert_storm_clear_share: float = Field(-1.0, description="Storm ends at or below this share (-1 = half the start)")
    alert_storm_min_devices: int = Field(5, ge=1, description="Devices with open alerts needed for a storm")
    alert_storm_window_ms: int = Field(60_000, gt=0, description="A device is active if scored within this window")
    alert_storm_sample: int = Field(20, ge=0, description="Devices listed in a storm alert")
    alert_routes: str = Field("", description="Receivers and routes file (YAML or JSON); '' = no delivery")
    alert_timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one delivery attempt")
    alert_retry_max_attempts: int = Field(8, ge=1, description="Delivery attempts before dead-lettering")
    alert_retry_base_s: float = Field(0.5, gt=0, description="First retry delay ceiling (full jitter, doubling)")
    alert_retry_max_delay_s: float = Field(30.0, gt=0, description="Largest retry delay (and Retry-After honoured)")
    alert_retry_budget_s: float = Field(120.0, gt=0, description="Longest time one delivery may spend retrying")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # IOTAD_<NAME>_FILE: right after the layer (environment, .env) it is read from.
        env_files = ValueFileSettingsSource(settings_cls, "env")
        env_file = getattr(dotenv_settings, "env_file", None)  # Settings(_env_file=...) included
        dotenv_files = ValueFileSettingsSource(settings_cls, "dotenv", env_file=env_file)
        return init_settings, env_settings, env_files, dotenv_settings, dotenv_files, file_secret_settings

    @property
    def readings_topic(self) -> str:
        return f"{self.topic_prefix}.readings"

    @property
    def scores_topic(self) -> str:
        return f"{self.topic_prefix}.scores"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def registry(self) -> str:
        """The effective registry location."""
        return self.registry_url or str(self.data_dir / "registry")

    @property
    def control_topic(self) -> str:
        return f"{self.topic_prefix}.{self.control_topic_suffix}"

    @property
    def alerts_topic(self) -> str:
        return f"{self.topic_prefix}.alerts"

    @property
    def alerts_dlq_topic(self) -> str:
        return f"{self.topic_prefix}.alerts.dlq"
