"""The model registry on a local directory and on fsspec (``memory://``): lifecycle, atomicity, integrity."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from models.artifact import METADATA, WEIGHTS, ArtifactError, Normaliser, load_artifact, save_artifact
from models.forecaster import Forecaster, ForecasterConfig
from models.registry import INDEX, ModelRegistry, RegistryError, open_registry

FEATURES = ("temp", "pressure", "vibration", "current")


def make_artifact(directory: Path, version: str, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(n_features=len(FEATURES), hidden=4, layers=1, dropout=0.0))
    norm = Normaliser(np.arange(4, dtype=np.float64), np.ones(4))
    extra = {"training": {"metrics": {"val_mse": 0.1 + seed, "test_mse": 0.2 + seed, "epochs": 3}}}
    return save_artifact(directory / version, model, FEATURES, norm, version=version, extra=extra)


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    if request.param == "local":
        yield open_registry(tmp_path / "registry")
        return
    url = f"memory://registry-{uuid.uuid4().hex[:8]}"
    yield open_registry(url)
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def artifacts(tmp_path):
    src = tmp_path / "artifacts"
    return {v: make_artifact(src, v, seed=i) for i, v in enumerate(("v1", "v2", "v3"))}


def index_bytes(registry: ModelRegistry) -> bytes | None:
    try:
        return registry._store.read(INDEX)
    except FileNotFoundError:
        return None


def test_register_promote_rollback_list(registry, artifacts):
    assert registry.champion() is None and registry.list() == []
    for v in ("v1", "v2", "v3"):
        assert registry.register(artifacts[v]) == v
    assert [(i.version, i.stage) for i in registry.list()] == [
        ("v1", "candidate"),
        ("v2", "candidate"),
        ("v3", "candidate"),
    ]
    info = registry.info("v2")
    assert info.sha256 == json.loads((artifacts["v2"] / METADATA).read_text())["sha256"]
    assert info.metrics["val_mse"] == pytest.approx(1.1) and info.features == FEATURES

    assert registry.promote("v1") is None
    assert registry.promote("v2") == "v1"
    assert registry.promote("v2") == "v2"  # no-op
    assert registry.promote("v3") == "v2"
    stages = {i.version: i.stage for i in registry.list()}
    assert stages == {"v1": "retired", "v2": "retired", "v3": "champion"}
    assert registry.champion() == "v3"

    assert registry.rollback() == "v2"
    assert registry.champion() == "v2"
    assert {i.version: i.stage for i in registry.list()} == {"v1": "retired", "v2": "champion", "v3": "retired"}
    assert registry.rollback(reason="bad deploy") == "v1"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    assert registry.champion() == "v1"
    actions = [(h["action"], h["version"], h["previous"]) for h in registry.history()]
    assert actions == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("promote", "v3", "v2"),
        ("rollback", "v2", "v3"),
        ("rollback", "v1", "v2"),
    ]
    local = registry.local_path("v3")
    if registry.url.startswith("memory://"):
        assert local is None
    else:
        assert load_artifact(local).version == "v3"
    shown = registry.show("v3")
    assert shown["stage"] == "retired" and not shown["is_champion"]
    assert shown["metadata"]["features"] == list(FEATURES)
    with pytest.raises(RegistryError, match="unknown version"):
        registry.promote("v9")


def test_register_is_idempotent_and_versions_are_immutable(registry, artifacts, tmp_path):
    assert registry.register(artifacts["v1"]) == "v1"
    generation = registry.generation()
    assert registry.register(artifacts["v1"]) == "v1"
    assert registry.generation() == generation  # nothing written
    other = make_artifact(tmp_path / "other", "v1", seed=42)
    with pytest.raises(RegistryError, match="already registered"):
        registry.register(other)


def test_register_refuses_hash_mismatch(registry, artifacts):
    weights = artifacts["v1"] / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        registry.register(artifacts["v1"])
    assert index_bytes(registry) is None and registry.list() == [] and registry.orphans() == []


@pytest.mark.parametrize("fail_on", [METADATA, INDEX])
def test_crash_mid_register_leaves_index_unchanged(registry, artifacts, monkeypatch, fail_on):
    registry.register(artifacts["v1"])
    registry.promote("v1")
    before = index_bytes(registry)
    store = registry._store
    real_put = store._put

    def failing_put(path, data):
        if str(path).endswith(fail_on):
            raise OSError("disk full (simulated)")
        real_put(path, data)

    monkeypatch.setattr(store, "_put", failing_put)
    with pytest.raises(OSError, match="simulated"):
        registry.register(artifacts["v2"])
    monkeypatch.undo()

    assert index_bytes(registry) == before
    assert [i.version for i in registry.list()] == ["v1"] and registry.champion() == "v1"
    with pytest.raises(ArtifactError, match="unknown version"):
        registry.fetch("v2", Path(artifacts["v2"]).parent / "cache")
    with pytest.raises(RegistryError):
        registry.promote("v2")
    # Whatever was copied is unreferenced; registering again replaces it.
    assert set(registry.orphans()) <= {"v2"}
    assert registry.register(artifacts["v2"]) == "v2"
    assert registry.orphans() == []
    assert load_artifact(registry.fetch("v2", Path(artifacts["v2"]).parent / "cache")).version == "v2"


def test_local_crash_mid_register_leaves_no_directory(tmp_path, artifacts, monkeypatch):
    registry = open_registry(tmp_path / "registry")
    monkeypatch.setattr(registry._store, "_put", lambda path, data: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        registry.register(artifacts["v1"])
    versions = tmp_path / "registry" / "versions"
    assert not versions.exists() or list(versions.iterdir()) == []
    assert not (tmp_path / "registry" / INDEX).exists()


def test_fetch_verifies_and_caches(registry, artifacts, tmp_path):
    registry.register(artifacts["v1"])
    cache = tmp_path / "cache"
    path = registry.fetch("v1", cache, expected_features=FEATURES)
    assert path == cache / "v1"
    art = load_artifact(path, expected_features=FEATURES)
    assert art.version == "v1"
    # A damaged cached copy is downloaded again.
    (path / WEIGHTS).write_bytes(b"garbage")
    assert load_artifact(registry.fetch("v1", cache)).version == "v1"
    with pytest.raises(ArtifactError, match="feature set"):
        registry.fetch("v1", tmp_path / "cache-2", expected_features=("temp",))
    assert not (tmp_path / "cache-2" / "v1").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "metadata"])
def test_fetch_refuses_corrupt_or_partial_artifact(registry, artifacts, tmp_path, damage):
    registry.register(artifacts["v1"])
    store = registry._store
    key = f"versions/v1/{WEIGHTS}"
    weights = store.read(key)
    if damage == "flip":
        store.write(key, weights[:-1] + bytes([weights[-1] ^ 0xFF]))
    elif damage == "truncate":
        store.write(key, weights[: len(weights) // 2])
    elif damage == "missing":
        store.remove_dir("versions/v1")
    else:
        meta = json.loads(store.read(f"versions/v1/{METADATA}"))
        meta["normalisation"]["mean"][0] += 1.0  # weights intact, metadata altered
        store.write(f"versions/v1/{METADATA}", json.dumps(meta).encode())
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError) as info:
        registry.fetch("v1", cache)
    assert "v1" in str(info.value)
    assert not (cache / "v1").exists()
    assert [p.name for p in cache.iterdir()] == []  # no temporary left behind
    # A version the workers would refuse never becomes the champion.
    with pytest.raises(RegistryError, match="refusing"):
        registry.promote("v1")
    assert registry.champion() is None and registry.info("v1").stage == "candidate"


def test_corrupt_index_is_never_overwritten(registry, artifacts):
    registry.register(artifacts["v1"])
    registry._store.write(INDEX, b"{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        registry.register(artifacts["v2"])
    with pytest.raises(RegistryError):
        registry.champion()
    assert registry._store.read(INDEX) == b"{not json"


def test_reports(registry):
    first = registry.write_report({"version": "v1", "decision": "promoted"})
    second = registry.write_report({"decision": "insufficient-data"})
    assert first.endswith("-v1.json") and second.endswith("-none.json")
    assert registry.reports() == [first, second]
    assert registry.read_report(first)["decision"] == "promoted"
    with pytest.raises(RegistryError):
        registry.read_report("nope.json")


def test_invalid_version_label(tmp_path):
    registry = open_registry(tmp_path / "registry")
    bad = make_artifact(tmp_path / "src", "v1")
    meta = json.loads((bad / METADATA).read_text())
    meta["version"] = "../escape"
    (bad / METADATA).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="invalid version"):
        registry.register(bad)


def test_cli_model_commands(tmp_path, artifacts, monkeypatch):
    from pipeline.cli import app

    monkeypatch.setenv("IOTAD_REGISTRY_URL", str(tmp_path / "cli-registry"))
    runner = CliRunner()
    for v in ("v1", "v2"):
        result = runner.invoke(app, ["model", "register", str(artifacts[v])])
        assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["model", "promote", "v1", "--no-notify"]).exit_code == 0
    assert runner.invoke(app, ["model", "promote", "v2", "--no-notify"]).exit_code == 0
    listed = runner.invoke(app, ["model", "list", "--json"])
    assert listed.exit_code == 0
    assert {d["version"]: d["stage"] for d in json.loads(listed.stdout)} == {"v1": "retired", "v2": "champion"}
    table = runner.invoke(app, ["model", "list"])
    assert "champion" in table.output and "v2" in table.output
    assert runner.invoke(app, ["model", "rollback", "--no-notify"]).exit_code == 0
    shown = runner.invoke(app, ["model", "show", "v1"])
    assert json.loads(shown.stdout)["is_champion"] is True
    missing = runner.invoke(app, ["model", "promote", "v7", "--no-notify"])
    assert missing.exit_code == 1 and "unknown version" in missing.output
