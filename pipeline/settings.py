"""All runtime settings in one place.

Every field is read from an environment variable with the ``IOTAD_`` prefix (``IOTAD_STEP_MS=500``)
or from a ``.env`` file in the working directory. Settings are loaded once at start-up and passed
down; no other module reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import DEFAULT_MODEL_DIR


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IOTAD_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated")
    topic_prefix: str = Field("iotad", description="Topics are <prefix>.readings, .scores, .dlq")
    partitions: int = Field(4, description="Partitions of the readings topic (and the state changelog)")
    app_id: str = Field("iotad-worker", description="Faust app id = consumer group id")
    broker_session_timeout_s: float = Field(6.0, description="Kafka consumer session timeout")

    # Windowing
    step_ms: int = Field(1000, description="Model step: readings are resampled to this period")
    grace_ms: int = Field(0, description="How long a resample bucket stays open after its end")
    idle_flush_ms: int = Field(2000, description="Close an open bucket after this much wall time without data")
    max_gap_steps: int = Field(10, description="Gaps up to this many steps are forward-filled; longer reset state")
    max_future_skew_ms: int = Field(300_000, description="Readings further in the future are rejected")
    min_timestamp_ms: int = Field(946_684_800_000, description="Readings older than this are rejected")

    # Batching
    batch_max: int = Field(2000, description="Most messages in one micro-batch")
    batch_within_s: float = Field(0.02, description="Longest wait to fill a micro-batch")

    # Model and scoring
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Directory holding the model artifact")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device; auto = cuda if present")
    warmup_steps: int = Field(30, description="Steps a device is 'warming_up' before it can be flagged")
    threshold_method: Literal["static", "adaptive"] = Field("static", description="Thresholding method")
    threshold: float = Field(5.0, description="Static threshold on the normalised score")
    adaptive_quantile: float = Field(0.999, description="Quantile tracked by the adaptive threshold")
    adaptive_margin: float = Field(1.5, description="Adaptive threshold = margin x tracked quantile")
    learn_from_anomalies: bool = Field(False, description="Let flagged steps update the error statistics")
    error_halflife_steps: float = Field(200.0, description="Half-life of the per-device error statistics")
    burnin_steps: int = Field(5, description="Forecasts right after a (re)start of a device's state not learnt from")

    # InfluxDB
    influx_url: str = Field("http://127.0.0.1:8086", description="InfluxDB base URL")
    influx_version: int = Field(1, ge=1, le=2, description="1 = v1 /write API; 2 = v2/v3 API via influxdb-client")
    influx_database: str = Field("iotad", description="v1 database (v2: bucket)")
    influx_org: str = Field("iotad", description="v2 organisation")
    influx_token: str = Field("", description="v2 token")
    influx_measurement: str = Field("anomaly_scores", description="Measurement the scores are written to")

    # Observability
    metrics_port: int = Field(9464, description="Prometheus metrics port on 127.0.0.1 (0 = off)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds")
    log_level: str = Field("INFO", description="Log level")

    # Local stack
    data_dir: Path = Field(Path(".iotad"), description="Where the local stack keeps its data and logs")

    @property
    def readings_topic(self) -> str:
        return f"{self.topic_prefix}.readings"

    @property
    def scores_topic(self) -> str:
        return f"{self.topic_prefix}.scores"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"
