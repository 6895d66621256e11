"""No secret reaches a log: a real worker (PipelineStack) with every secret setting set, readings pushed
through, then its log, the servers' logs, its environment and the output of CLI commands are searched for
the secret values.

The InfluxDB token is really used: the v1 writer sends ``Authorization: Token <token>`` and InfluxDB 1.x
without authentication accepts it, so every reading still becomes a point. The Kafka SASL password is set
but unused (the embedded Tansu is PLAINTEXT; SASL is pinned by tests/unit/test_kafka_security.py).
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from connectors.influx import count_points
from connectors.simulator import FleetSimulator, make_producer, run_simulation
from pipeline.settings import Settings
from pipeline.settings_files import secret_fields
from pipeline.stack import PipelineStack

pytestmark = pytest.mark.integration


def _iotad(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_secret_in_logs_env_or_cli_output(tmp_path: Path) -> None:
    values = {name: f"SECRET-{name}-{secrets.token_hex(12)}" for name in secret_fields(Settings)}
    assert {"influx_token", "kafka_sasl_password"} <= set(values)
    s = Settings(
        topic_prefix="sec",
        app_id="sec-worker",
        influx_database="sec",
        data_dir=tmp_path / "data",
        warmup_steps=5,
        kafka_sasl_username="iotad",
        log_level="DEBUG",  # the chattiest the worker gets
        **{name: SecretStr(v) for name, v in values.items()},
    )
    with PipelineStack(s) as stack:
        worker = stack.procs[0]
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
        producer = make_producer(stack.bootstrap)
        sim = FleetSimulator(5, seed=9, step_ms=s.step_ms, anomaly_rate=0)
        stats = run_simulation(producer, s.readings_topic, sim, steps=30, end_at_now=True, malformed_every=25)
        producer.close()
        deadline = time.monotonic() + 90
        points = 0
        # the points are written behind the scores (a write-behind buffer, retried), so wait for them too
        while time.monotonic() < deadline:
            if stack.total("iotad_readings_scored_total") >= stats.readings_sent:
                points = count_points(stack.influx_url, s.influx_database, s.influx_measurement, field="threshold")
                if points >= stats.readings_sent:
                    break
            time.sleep(0.3)
        assert stack.run_dir is not None
        run_dir = stack.run_dir
        secret_files = sorted((run_dir / "secrets").iterdir())

    assert points == stats.readings_sent, "the worker writes with the token set"
    # The worker got its secrets as private files, not in its environment.
    assert b"IOTAD_INFLUX_TOKEN_FILE=" in environ and b"IOTAD_INFLUX_TOKEN=" not in environ
    assert {p.name for p in secret_files} == set(values)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secret_files)
    outputs: dict[str, str] = {"worker environment": environ.decode(errors="replace")}
    for path in run_dir.rglob("*"):
        if path.is_file() and "secrets" not in path.relative_to(run_dir).parts:
            outputs[str(path.relative_to(run_dir))] = path.read_text(errors="replace")
    assert any(name.startswith("worker-") for name in outputs)
    assert "DEBUG" in outputs["worker-0.log"]

    # CLI commands, with the secrets in the environment (one of them through a mounted file).
    (tmp_path / "token").write_text(values["influx_token"] + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTAD_")}
    env = {
        **base,
        **{f"IOTAD_{name.upper()}": v for name, v in values.items() if name != "influx_token"},
        "IOTAD_INFLUX_TOKEN_FILE": str(tmp_path / "token"),
        "IOTAD_KAFKA_SASL_USERNAME": "iotad",
        "IOTAD_REGISTRY_URL": str(tmp_path / "registry"),
        "IOTAD_LOG_LEVEL": "DEBUG",
    }
    commands = {
        "settings-doc": (["settings-doc"], {}, 0),
        "help": (["--help"], {}, 0),
        "worker help": (["worker", "--help"], {}, 0),
        "bad value": (["simulate", "--steps", "1"], {"IOTAD_STEP_MS": "x"}, 2),
        "sasl without user": (
            ["simulate", "--steps", "1"],
            {"IOTAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "IOTAD_KAFKA_SASL_USERNAME": ""},
            2,
        ),
        "both set": (["simulate", "--steps", "1"], {"IOTAD_INFLUX_TOKEN": values["influx_token"]}, 2),
        "failing command": (["model", "show", "no-such-version"], {}, 1),
    }
    for label, (args, extra, rc) in commands.items():
        done = _iotad(args, {**env, **extra}, tmp_path)
        assert done.returncode == rc, (label, done.stdout[-2000:], done.stderr[-2000:])
        outputs[f"iotad {label}"] = done.stdout + done.stderr
    assert "IOTAD_INFLUX_TOKEN_FILE" in outputs["iotad settings-doc"]
    assert "both IOTAD_INFLUX_TOKEN and IOTAD_INFLUX_TOKEN_FILE" in outputs["iotad both set"]

    leaks = [(where, name) for where, text in outputs.items() for name, v in values.items() if v in text]
    assert not leaks, leaks
