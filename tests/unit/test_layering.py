"""The one-way data flow of ARCHITECTURE.md, checked on the source: source -> validate -> window -> batch-step
-> score -> sinks. `models/` (everything torch) imports neither `pipeline/` nor `connectors/`; `connectors/`
(everything that talks to an outside system) imports from `pipeline/` only the wire contract
`pipeline.schema`; the pure cores (validate, window, and the processor that runs the chain) import no sink,
no Faust app and no agent; and no shipped package imports the tests, nor any but the CLI a benchmark."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("models", "connectors", "pipeline", "bench", "tests")


def imports_of(path: Path) -> set[str]:
    """First-party modules ``path`` imports (absolute imports, anywhere in the file, lazy ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import schema` names the module in the alias
            found |= {f"{node.module}.{a.name}" for a in node.names if node.module in FIRST_PARTY}
    return {m for m in found if m.split(".")[0] in FIRST_PARTY}


def package_imports(package: str) -> dict[str, set[str]]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts): imports_of(p)
        for p in sorted((REPO / package).rglob("*.py"))
    }


def offending(imports: dict[str, set[str]], allowed: tuple[str, ...]) -> dict[str, set[str]]:
    """The imports of each module outside its own package and outside ``allowed`` (prefixes)."""
    out = {}
    for mod, names in imports.items():
        own = mod.split(".")[0]
        bad = {n for n in names if n.split(".")[0] != own and not n.startswith(allowed)}
        if bad:
            out[mod] = bad
    return out


def test_the_import_scan_sees_real_edges() -> None:
    # (a scan that found nothing would pass every rule below)
    pipeline = package_imports("pipeline")
    assert {"pipeline.schema", "pipeline.windowing", "pipeline.records"} <= pipeline["pipeline.processor"]
    assert "pipeline.schema" in package_imports("connectors")["connectors.simulator"]
    assert "models.scoring" in package_imports("models")["models.detector"]


def test_models_import_neither_pipeline_nor_connectors() -> None:
    assert offending(package_imports("models"), allowed=()) == {}


def test_connectors_import_only_the_wire_contract_from_pipeline() -> None:
    assert offending(package_imports("connectors"), allowed=("pipeline.schema",)) == {}


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("pipeline.schema", ()),  # validate
        ("pipeline.windowing", ()),  # window
        # what a scored step is, and its InfluxDB line (the line-protocol encoding, pure functions)
        ("pipeline.records", ("models.scoring", "connectors.influx")),
        ("pipeline.continuity", ()),
        ("pipeline.cadence", ()),
        ("pipeline.processor", ("pipeline.schema", "pipeline.windowing", "pipeline.records", "models")),
    ],
)
def test_the_pure_cores_import_no_io_shell(module: str, allowed: tuple[str, ...]) -> None:
    imports = package_imports("pipeline")[module]
    assert {n for n in imports if not n.startswith(allowed)} == set()


@pytest.mark.parametrize("package", ["models", "connectors", "pipeline", "bench"])
def test_shipped_packages_import_no_test_and_only_the_cli_a_benchmark(package: str) -> None:
    # `iotad bench ...` and `iotad evaluate` are the CLI's; nothing on the data path imports a benchmark
    bad = {
        m: {n for n in names if n.startswith("tests") or (n.startswith("bench") and package != "bench")}
        for m, names in package_imports(package).items()
        if m != "pipeline.cli"
    }
    assert {m: names for m, names in bad.items() if names} == {}
    assert not any(n.startswith("tests") for n in package_imports("pipeline")["pipeline.cli"])
