"""The repository secret scan (deploy/secret_scan.py, run by ``make test``).

Secret-shaped samples are assembled at run time, so this file itself holds none.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deploy.secret_scan import entropy, scan, scan_text

ROOT = Path(__file__).resolve().parents[2]
J = "".join

SAMPLES = {
    "private-key": J(["-----BEGIN ", "RSA PRIVATE KEY-----"]),
    "aws-access-key-id": J(["AKIA", "Q3HDR7ZK2M4N5P6W"]),
    "github-token": J(["ghp_", "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"]),
    "slack-token": J(["xoxb-", "2468013579-1357924680-AbCdEfGhIjKlMnOp"]),
    "slack-webhook": J(["https://hooks.slack.com/services/", "T0A1B2C3D/B4E5F6G7H/", "q9W8e7R6t5Y4u3I2o1P0aSdF"]),
    "google-api-key": J(["AIza", "SyD4x9Qm2Lk8Jh7Gf6Ds5Aa4Pp3Oo2Ii1Ux"]),
    "jwt": J(
        ["eyJ", "hbGciOiJIUzI1NiJ9", ".eyJ", "zdWIiOiIxMjM0NTY3ODkwIn0", ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"]
    ),
    "url-credentials": J(["postgres://iotad:", "Xk7#pQ2vL9mZ4wR8", "@db.internal:5432/iotad"]),
    "secret-assignment": J(["INFLUX_TOKEN = '", "q8Zr4Lm2Xv9Tn6Bc1Hd5Kw3Pj7Fs0Ga", "'"]),
}


@pytest.mark.parametrize("rule", sorted(SAMPLES))
def test_each_rule_finds_its_secret_and_never_prints_it(rule: str) -> None:
    findings = list(scan_text("config/app.env", f"x = 1\n{SAMPLES[rule]}\n"))
    assert [f.rule for f in findings] == [rule]
    assert findings[0].line == 2
    assert SAMPLES[rule][-12:] not in str(findings[0])


@pytest.mark.parametrize(
    "line",
    [
        "INFLUX_TOKEN=CHANGE-ME-influx-operator-token",
        "password: $INFLUX_GRAFANA_PASSWORD",
        "token: ${INFLUX_TOKEN:?set INFLUX_TOKEN}",
        "secret_file: /run/secrets/iotad_webhook_secret",
        "api_key = os.environ['IOTAD_API_KEY']",
        "password=self.password.get_secret_value(),",
        "token = settings.influx_token",
        "postgres://postgres:postgres@localhost",
        "ALERT_WEBHOOK_URL=https://hooks.slack.com/services/CHANGE/ME/PLEASE",
        "token: <your token here>",
    ],
)
def test_placeholders_references_and_code_are_not_secrets(line: str) -> None:
    assert list(scan_text("docker-compose.yml", line)) == []


def test_allow_marker_and_test_files() -> None:
    sample = SAMPLES["secret-assignment"]
    assert list(scan_text("app.py", sample + "  # secret-scan: allow")) == []
    assert list(scan_text("app.py", sample + "  # pragma: allowlist secret")) == []
    # Tests hold deliberate fakes: only the unmistakable shapes count there.
    assert list(scan_text("tests/unit/test_x.py", sample)) == []
    assert [f.rule for f in scan_text("tests/unit/test_x.py", SAMPLES["private-key"])] == ["private-key"]


def test_entropy() -> None:
    assert entropy("aaaaaaaa") == 0.0
    assert entropy("abcdefgh") == 3.0


def test_scan_files_and_allow_file(tmp_path: Path) -> None:
    (tmp_path / "leak.env").write_text(SAMPLES["aws-access-key-id"] + "\n")
    (tmp_path / "ok.txt").write_text("nothing here\n")
    (tmp_path / "blob.bin").write_bytes(b"\0" + SAMPLES["private-key"].encode())
    assert [(f.path, f.rule) for f in scan(tmp_path, ["leak.env", "ok.txt", "blob.bin"])] == [
        ("leak.env", "aws-access-key-id")
    ]
    (tmp_path / ".secret-scan-allow").write_text("# fixtures\n*.env\n")
    assert scan(tmp_path, ["leak.env"]) == []


def test_the_repository_is_clean() -> None:
    """What ``make test`` runs: ``python -m deploy.secret_scan`` exits 0 on this checkout."""
    done = subprocess.run(
        [sys.executable, "-m", "deploy.secret_scan"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
