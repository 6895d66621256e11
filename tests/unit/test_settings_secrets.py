"""Secrets in settings: SecretStr masking, IOTAD_<NAME>_FILE, the CLI never echoing them, child processes."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.settings import Settings
from pipeline.settings_files import ValueFileSettingsSource, secret_fields, secret_files_env
from pipeline.stack import PipelineStack

TOKEN = "tok-7bq2-Xr9Lm-never-print-me"
PASSWORD = "pw-4Jd8-Kk2Pz-never-print-me"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env from the working tree
    for k in list(os.environ):
        if k.startswith("IOTAD_"):
            monkeypatch.delenv(k)


def test_secret_fields() -> None:
    assert {"influx_token", "kafka_sasl_password"} <= set(secret_fields(Settings))
    assert "kafka_sasl_username" not in secret_fields(Settings)


def test_secrets_never_print(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(influx_token=TOKEN, kafka_sasl_password=PASSWORD)
    assert s.influx_token.get_secret_value() == TOKEN
    caplog.set_level(logging.INFO)
    logging.getLogger("iotad.test").info("settings: %s / %r", s, s)
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()), caplog.text):
        assert TOKEN not in text and PASSWORD not in text
    assert "**********" in repr(s)


def test_value_from_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token, password, step = tmp_path / "token", tmp_path / "password", tmp_path / "step"
    token.write_text(TOKEN + "\n")
    password.write_text(PASSWORD + "\r\n")
    step.write_text("250")
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN_FILE", str(token))
    monkeypatch.setenv("iotad_kafka_sasl_password_file", str(password))  # names are case-insensitive
    monkeypatch.setenv("IOTAD_STEP_MS_FILE", str(step))  # any setting, typed as usual
    s = Settings()
    assert s.influx_token.get_secret_value() == TOKEN
    assert s.kafka_sasl_password.get_secret_value() == PASSWORD
    assert s.step_ms == 250
    assert Settings(influx_token="explicit").influx_token.get_secret_value() == "explicit"  # init args win


def test_value_from_file_named_in_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tok").write_text(TOKEN)
    (tmp_path / ".env").write_text(f"IOTAD_INFLUX_TOKEN_FILE={tmp_path / 'tok'}\n")
    assert Settings().influx_token.get_secret_value() == TOKEN
    # A file named in the environment beats a value in .env, like the variables themselves.
    (tmp_path / "tok2").write_text("from-env-file")
    (tmp_path / ".env").write_text("IOTAD_INFLUX_TOKEN=from-dotenv\n")
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN_FILE", str(tmp_path / "tok2"))
    assert Settings().influx_token.get_secret_value() == "from-env-file"


def test_file_errors_name_the_variable_never_the_content(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(TOKEN)
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN_FILE", str(tmp_path / "tok"))
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN", TOKEN)
    with pytest.raises(SettingsError, match="both IOTAD_INFLUX_TOKEN and IOTAD_INFLUX_TOKEN_FILE") as info:
        Settings()
    assert TOKEN not in str(info.value)
    monkeypatch.delenv("IOTAD_INFLUX_TOKEN")
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match=r"IOTAD_INFLUX_TOKEN_FILE=.*missing: cannot read"):
        Settings()
    big = tmp_path / "big"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    monkeypatch.setenv("IOTAD_INFLUX_TOKEN_FILE", str(big))
    with pytest.raises(SettingsError, match="more than"):
        Settings()


def test_a_field_named_x_file_keeps_its_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class S(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="T_", extra="ignore")
        routes: str = Field("")
        routes_file: str = Field("")

        @classmethod
        def settings_customise_sources(  # type: ignore[no-untyped-def]
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return init_settings, env_settings, ValueFileSettingsSource(settings_cls, "env")

    monkeypatch.setenv("T_ROUTES_FILE", "/etc/routes.yaml")
    s = S()
    assert s.routes_file == "/etc/routes.yaml" and s.routes == ""


def test_secret_files_for_child_processes(tmp_path: Path) -> None:
    s = Settings(influx_token=TOKEN)  # kafka_sasl_password empty: no file
    env = secret_files_env(s, tmp_path / "secrets")
    assert list(env) == ["IOTAD_INFLUX_TOKEN_FILE"]
    path = Path(env["IOTAD_INFLUX_TOKEN_FILE"])
    assert path.read_text() == TOKEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_stack_workers_get_secrets_as_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(influx_token=TOKEN, kafka_sasl_password=PASSWORD, kafka_sasl_username="iotad")
    stack = PipelineStack(s, workers=0)
    stack.stack = SimpleNamespace(bootstrap="127.0.0.1:1", influx_url="http://127.0.0.1:2")  # type: ignore[assignment]
    stack.run_dir = tmp_path / "run"
    stack.run_dir.mkdir()
    env = stack.worker_env()
    assert not any(TOKEN in v or PASSWORD in v for v in env.values())
    assert "IOTAD_INFLUX_TOKEN" not in env and "IOTAD_KAFKA_SASL_PASSWORD" not in env
    assert env["IOTAD_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"  # the embedded Tansu is plain TCP
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    child = Settings()  # what the worker process loads
    assert child.influx_token.get_secret_value() == TOKEN
    assert child.kafka_sasl_password.get_secret_value() == PASSWORD


def _env() -> dict[str, str]:
    return {"IOTAD_INFLUX_TOKEN": TOKEN, "IOTAD_KAFKA_SASL_PASSWORD": PASSWORD}


def test_settings_doc_and_help_never_show_values() -> None:
    runner = CliRunner()
    doc = runner.invoke(app, ["settings-doc"], env=_env())
    assert doc.exit_code == 0, doc.output
    assert "`IOTAD_INFLUX_TOKEN`" in doc.output and "IOTAD_INFLUX_TOKEN_FILE" in doc.output
    assert "`IOTAD_KAFKA_SECURITY_PROTOCOL` | `PLAINTEXT`" in doc.output
    for args in (["--help"], ["worker", "--help"], ["bench", "--help"]):
        out = runner.invoke(app, args, env=_env())
        assert out.exit_code == 0
        assert TOKEN not in out.output and PASSWORD not in out.output
    assert TOKEN not in doc.output and PASSWORD not in doc.output


def test_invalid_settings_are_reported_without_values() -> None:
    """A bad value is never echoed (pydantic's messages include the input: it could be a secret)."""
    runner = CliRunner()
    out = runner.invoke(app, ["simulate", "--steps", "1"], env={**_env(), "IOTAD_STEP_MS": PASSWORD})
    assert out.exit_code == 2
    assert "invalid settings" in out.output and "step_ms" in out.output
    assert PASSWORD not in out.output and TOKEN not in out.output
    out = runner.invoke(app, ["simulate", "--steps", "1"], env={**_env(), "IOTAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert out.exit_code == 2 and "kafka_sasl_username" in out.output
    assert PASSWORD not in out.output and TOKEN not in out.output
