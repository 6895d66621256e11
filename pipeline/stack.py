"""The embedded local stack: Tansu + InfluxDB + topics + scoring worker processes, on loopback.

``iotad up`` and ``iotad demo`` use it, and so do the integration tests: everything here is real
(servers, worker processes), started on free loopback ports and stopped by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from connectors.kafka_admin import create_topics
from connectors.localstack import LocalStack, free_port, new_run_dir
from pipeline.settings import Settings
from pipeline.settings_files import secret_fields, secret_files_env

# Pollers of a busy worker: every scrape renders all metrics on the worker's CPU, so measure idle workers
# often (to catch the first message) and busy ones rarely, end times from the worker's own timestamps.
IDLE_POLL_S = 0.1
BUSY_POLL_S = 0.5


def metric_value(text: str, name: str) -> float:
    """Sum of all samples of ``name`` (any labels) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class WorkerProcess:
    """One ``iotad worker`` (or ``iotad alerter``, see ``command``) child process with its own metrics port and log."""

    env: dict[str, str]
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    command: str = "worker"
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = {**self.env, "IOTAD_METRICS_PORT": str(self.metrics_port), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", self.command, "--metrics-port", str(self.metrics_port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def metrics(self, timeout_s: float = 2.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return str(r.read().decode())

    def metric(self, name: str) -> float:
        return self.metric_values(name)[name]

    def metric_values(self, *names: str) -> dict[str, float]:
        """Several metrics from ONE scrape (a scrape costs the worker CPU: pollers should not multiply it)."""
        try:
            text = self.metrics()
        except OSError:
            return dict.fromkeys(names, float("nan"))
        return {name: metric_value(text, name) for name in names}

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the worker has partitions assigned (its consumer joined the group)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            if self.metric("iotad_assigned_partitions") > 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout_s}s; see {self.log_path}")

    def stop(self, timeout_s: float = 15.0, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None


@dataclass
class PipelineStack:
    """Servers + topics + ``workers`` scoring workers, configured through ``settings``."""

    settings: Settings
    workers: int = 1
    alerters: int = 0
    stack: LocalStack | None = None
    procs: list[WorkerProcess] = field(default_factory=list)
    alerter_procs: list[WorkerProcess] = field(default_factory=list)
    run_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # added to every child's environment (DEVLOG=1, ...)

    def start(self, *, wait: bool = True) -> Self:
        self.run_dir = new_run_dir(self.settings.data_dir)
        self.stack = LocalStack(self.run_dir, databases=(self.settings.influx_database,))
        try:
            self.stack.start()
            s = self.settings
            create_topics(
                self.stack.bootstrap,
                {s.readings_topic: s.partitions, s.scores_topic: s.partitions, s.dlq_topic: 1, s.control_topic: 1},
            )
            if self.alerters:
                create_topics(self.stack.bootstrap, {s.alerts_topic: 1, s.alerts_dlq_topic: 1})
            for _ in range(self.workers):
                self.add_worker(wait=False)
            for _ in range(self.alerters):
                self.add_alerter(wait=False)
            if wait:
                for w in [*self.procs, *self.alerter_procs]:
                    w.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def worker_env(self) -> dict[str, str]:
        assert self.stack is not None
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTAD_")}
        secrets = secret_fields(Settings)
        env.update(
            {
                f"IOTAD_{name.upper()}": str(getattr(s, name))
                for name in Settings.model_fields
                if name not in ("kafka_bootstrap", "influx_url", "influx_version", *secrets)
                and getattr(s, name) is not None
            }
        )
        # Secrets travel as private files (IOTAD_<NAME>_FILE), never in the child's environment.
        assert self.run_dir is not None
        env.update(secret_files_env(s, self.run_dir / "secrets"))
        env.update(
            IOTAD_KAFKA_BOOTSTRAP=self.stack.bootstrap,
            IOTAD_KAFKA_SECURITY_PROTOCOL="PLAINTEXT",  # the embedded Tansu listens in plain text
            IOTAD_INFLUX_URL=self.stack.influx_url,
            IOTAD_INFLUX_VERSION="1",
            IOTAD_METRICS_HOST="127.0.0.1",
        )
        env.update(self.extra_env)
        return env

    def add_worker(self, *, wait: bool = True) -> WorkerProcess:
        assert self.run_dir is not None
        w = WorkerProcess(self.worker_env(), self.run_dir / f"worker-{len(self.procs)}.log").start()
        self.procs.append(w)
        if wait:
            w.wait_ready()
        return w

    def add_alerter(self, *, wait: bool = True) -> WorkerProcess:
        """Start an ``iotad alerter`` process (ALERTING.md) with this stack's settings."""
        assert self.run_dir is not None
        log_path = self.run_dir / f"alerter-{len(self.alerter_procs)}.log"
        w = WorkerProcess(self.worker_env(), log_path, command="alerter").start()
        self.alerter_procs.append(w)
        if wait:
            w.wait_ready()
        return w

    @property
    def bootstrap(self) -> str:
        assert self.stack is not None
        return self.stack.bootstrap

    @property
    def influx_url(self) -> str:
        assert self.stack is not None
        return self.stack.influx_url

    def total(self, metric: str) -> float:
        return sum(w.metric(metric) for w in self.procs if w.proc and w.proc.poll() is None)

    def stop(self) -> None:
        for w in [*self.alerter_procs, *self.procs]:
            w.stop()
        if self.stack is not None:
            self.stack.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
