"""A versioned model registry on a local directory or any fsspec URL (``s3://bucket/prefix``, ``memory://x``).

Layout under the registry root::

    registry.json                         index: every version, its stage, the champion lineage, an audit log
    versions/<version>/model.safetensors  the artifact, byte for byte as save_artifact/save_trained wrote it
    versions/<version>/model.json
    reports/<UTC timestamp>-<version>.json  retraining reports (see pipeline/retrain.py)

A version's **stage** is ``candidate`` (registered, never served), ``champion`` (the one the workers must
serve; at most one) or ``retired`` (was champion once). ``registry.json`` keeps the champion *lineage*:
:meth:`ModelRegistry.promote` pushes a version onto it, :meth:`ModelRegistry.rollback` pops the current
champion and brings back the one before it; ``history`` is an append-only log of both.

**Atomicity.** Every object is written under a temporary name and then moved into place: on a local
directory with ``os.replace`` (after an fsync), on fsspec by writing a ``.tmp-*`` key and ``fs.mv`` (on
object stores a server-side copy: the final key appears whole or not at all). A version's files are
written *before* ``registry.json``, and ``registry.json`` is the only thing that makes a version exist, so
a crash in the middle of :meth:`ModelRegistry.register` leaves at worst an unreferenced directory under
``versions/`` (listed by :meth:`ModelRegistry.orphans`, overwritten when the version is registered again),
never a referenced half artifact. Readers (the scoring workers) only ever read whole ``registry.json``
documents, old or new.

**Concurrency assumption: a single writer.** Writes are read-modify-write of ``registry.json`` without a
lock (object stores give none portably). Exactly one process may write at a time: the retraining job,
run as a Kubernetes CronJob with ``concurrencyPolicy: Forbid`` (or a single ``iotad retrain --loop``
replica), and an operator using ``iotad model promote/rollback`` while no retraining runs. Any number of
readers (workers calling :meth:`ModelRegistry.champion` and :meth:`ModelRegistry.fetch`) is fine.

**Integrity.** :meth:`ModelRegistry.register` verifies the artifact (its weights' SHA-256 against its
metadata, and that it loads) before copying it, and records the SHA-256 of both files.
:meth:`ModelRegistry.fetch` downloads into a local cache directory, checks both hashes against the
registry and loads the artifact with :func:`~models.artifact.load_artifact`; anything wrong raises
:class:`~models.artifact.ArtifactError` and nothing is left in the cache, so the caller keeps serving its
current champion.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from models.artifact import METADATA, WEIGHTS, ArtifactError, load_artifact

Stage = Literal["candidate", "champion", "retired"]
INDEX = "registry.json"
VERSIONS = "versions"
REPORTS = "reports"
FORMAT = 1
ARTIFACT_FILES = (WEIGHTS, METADATA)
# Metrics copied from an artifact's training metadata into the index (shown by `iotad model list`).
TRAINING_METRICS = ("train_mse", "val_mse", "test_mse", "persistence_val_mse", "persistence_test_mse")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (unknown version, no previous champion, unreadable index)."""


def utc_now() -> str:
    """Now in UTC, ISO 8601 with milliseconds (``2026-01-02T03:04:05.678+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_version(version: str) -> str:
    """``version`` if it is a safe registry key (letters, digits, ``._+-``; at most 128), else RegistryError."""
    if not _VERSION_RE.match(version):
        raise RegistryError(f"invalid version label {version!r}: use letters, digits and ._+- (at most 128)")
    return version


# --------------------------------------------------------------------------------------------- storage


class _Store(Protocol):
    """Key-value storage under the registry root; keys are ``/``-separated relative paths."""

    url: str

    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""

    def write(self, key: str, data: bytes) -> None:
        """Write one object atomically (temporary name, then moved into place)."""

    def put_dir(self, key: str, files: Mapping[str, bytes]) -> None:
        """Write a directory of files, replacing whatever was there (each file atomically)."""

    def exists(self, key: str) -> bool: ...

    def listdir(self, key: str) -> builtins.list[str]:
        """Names (not paths) directly under ``key``; [] when it does not exist."""

    def remove_dir(self, key: str) -> None: ...


class LocalStore:
    """A directory on a local (or mounted) file system: temporary file + fsync + ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()  # absolute: the URL is handed to other processes
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _put(self, path: Path, data: bytes) -> None:
        """Write ``path`` atomically: a temporary sibling, fsync, then rename over."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; workers may run as another user
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def write(self, key: str, data: bytes) -> None:
        self._put(self._path(key), data)

    def put_dir(self, key: str, files: Mapping[str, bytes]) -> None:
        """Fill a temporary sibling directory, then rename it into place: all files appear at once."""
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            tmp.chmod(0o755)
            for name, data in files.items():
                self._put(tmp / name, data)
            if final.exists():  # an unreferenced leftover (single writer: nobody else is using it)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(final.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def listdir(self, key: str) -> builtins.list[str]:
        path = self._path(key)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def remove_dir(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FsspecStore:
    """Any fsspec file system: write a ``.tmp-<uuid>`` key, then ``fs.mv`` it onto the final key."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def read(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def _put(self, path: str, data: bytes) -> None:
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def write(self, key: str, data: bytes) -> None:
        self._put(self._path(key), data)

    def put_dir(self, key: str, files: Mapping[str, bytes]) -> None:
        # Object stores have no directory rename: each file is atomic, and the index (written after)
        # is what makes the directory count.
        if self.exists(key):
            self.remove_dir(key)
        for name, data in files.items():
            self._put(self._path(f"{key}/{name}"), data)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def listdir(self, key: str) -> builtins.list[str]:
        path = self._path(key)
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(path, detail=False))

    def remove_dir(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key), recursive=True)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as recorded in ``registry.json``."""

    version: str
    stage: Stage
    registered_at: str
    sha256: str
    metadata_sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    promoted_at: str | None = None
    retired_at: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "stage": self.stage,
            "registered_at": self.registered_at,
            "sha256": self.sha256,
            "metadata_sha256": self.metadata_sha256,
            "metrics": dict(self.metrics),
            "features": list(self.features),
            "promoted_at": self.promoted_at,
            "retired_at": self.retired_at,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, version: str, d: Mapping[str, Any]) -> VersionInfo:
        return cls(
            version=version,
            stage=d["stage"],
            registered_at=d["registered_at"],
            sha256=d["sha256"],
            metadata_sha256=d["metadata_sha256"],
            metrics=dict(d.get("metrics") or {}),
            features=tuple(d.get("features") or ()),
            promoted_at=d.get("promoted_at"),
            retired_at=d.get("retired_at"),
            source=d.get("source"),
        )


def _empty_index() -> dict[str, Any]:
    return {"format": FORMAT, "generation": 0, "updated_at": None, "versions": {}, "lineage": [], "history": []}


class ModelRegistry:
    """See the module docstring. ``url``: a local directory (``str`` or ``Path``) or an fsspec URL."""

    def __init__(self, url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> None:
        text = str(url)
        self._store: _Store
        if _is_local(text):
            self._store = LocalStore(Path(text.removeprefix("file://")))
        else:
            self._store = FsspecStore(text, storage_options)
        self.url = self._store.url

    def __repr__(self) -> str:
        return f"ModelRegistry({self.url!r})"

    # ----------------------------------------------------------------------------- index

    def _read_index(self) -> dict[str, Any]:
        try:
            raw = self._store.read(INDEX)
        except FileNotFoundError:
            return _empty_index()
        try:
            index = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"{self.url}/{INDEX} is not valid JSON ({exc}); refusing to touch it") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise RegistryError(f"{self.url}/{INDEX}: unsupported registry format {index.get('format')!r}")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        index["generation"] = int(index.get("generation", 0)) + 1
        index["updated_at"] = utc_now()
        self._store.write(INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())

    @staticmethod
    def _entry(index: Mapping[str, Any], version: str) -> dict[str, Any]:
        try:
            entry: dict[str, Any] = index["versions"][version]
        except KeyError:
            raise RegistryError(f"unknown version {version!r}") from None
        return entry

    # ----------------------------------------------------------------------------- reads

    def champion(self) -> str | None:
        """The version the workers must serve, or None when nothing was promoted yet."""
        lineage = self._read_index()["lineage"]
        return str(lineage[-1]) if lineage else None

    def generation(self) -> int:
        """Incremented on every write of the index (cheap change detection for pollers)."""
        return int(self._read_index().get("generation", 0))

    def list(self) -> builtins.list[VersionInfo]:
        """All registered versions, oldest registration first."""
        versions = self._read_index()["versions"]
        infos = [VersionInfo.from_dict(v, d) for v, d in versions.items()]
        return sorted(infos, key=lambda i: (i.registered_at, i.version))

    def info(self, version: str) -> VersionInfo:
        return VersionInfo.from_dict(version, self._entry(self._read_index(), version))

    def show(self, version: str) -> dict[str, Any]:
        """The index entry plus the artifact's metadata (``model.json``) and where it is stored."""
        index = self._read_index()
        entry = self._entry(index, version)
        try:
            metadata = json.loads(self._store.read(f"{VERSIONS}/{version}/{METADATA}"))
        except (OSError, ValueError) as exc:
            metadata = {"error": f"cannot read {METADATA}: {exc}"}
        return {
            "version": version,
            **entry,
            "is_champion": bool(index["lineage"]) and index["lineage"][-1] == version,
            "location": f"{self.url}/{VERSIONS}/{version}",
            "metadata": metadata,
        }

    def local_path(self, version: str) -> Path | None:
        """The version's directory when the registry is a local directory (else None: use :meth:`fetch`).

        Loading from there checks the weights against ``model.json`` but not against the index; prefer
        :meth:`fetch`, which checks both.
        """
        if not isinstance(self._store, LocalStore):
            return None
        self._entry(self._read_index(), version)
        return self._store.root / VERSIONS / version

    def history(self) -> builtins.list[dict[str, Any]]:
        """The audit log of promotions and rollbacks, oldest first."""
        return list(self._read_index()["history"])

    def orphans(self) -> builtins.list[str]:
        """Directories under ``versions/`` that the index does not reference (left by a crashed register)."""
        known = set(self._read_index()["versions"])
        return [n for n in self._store.listdir(VERSIONS) if n not in known and not n.startswith(".")]

    # ----------------------------------------------------------------------------- writes

    def register(
        self, artifact_dir: Path | str, *, metrics: Mapping[str, Any] | None = None, source: str | None = None
    ) -> str:
        """Copy a verified artifact into the registry as a ``candidate``; returns its version.

        The version is the artifact's own ``version`` (from its ``model.json``: the label the workers
        report as ``model_version``). Registering the same bytes again returns the version unchanged;
        another artifact under an existing version raises :class:`RegistryError` (versions are
        immutable). ``metrics`` are stored next to the training metrics found in the metadata;
        ``source`` (default: the directory's path) says where the artifact came from.
        Raises :class:`~models.artifact.ArtifactError` when the artifact is missing or corrupt.
        """
        directory = Path(artifact_dir)
        try:
            weights = (directory / WEIGHTS).read_bytes()
            meta_raw = (directory / METADATA).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{directory}: cannot read the artifact: {exc}") from exc
        try:
            meta = json.loads(meta_raw)
        except ValueError as exc:
            raise ArtifactError(f"{directory / METADATA}: not JSON: {exc}") from exc
        sha = _sha256(weights)
        if sha != meta.get("sha256"):
            raise ArtifactError(
                f"{directory / WEIGHTS}: sha256 {sha[:12]} does not match metadata {str(meta.get('sha256'))[:12]}"
            )
        load_artifact(directory)  # format, model class, loadable weights
        version = check_version(str(meta.get("version", "")))

        index = self._read_index()
        existing = index["versions"].get(version)
        if existing is not None:
            if existing["sha256"] == sha and existing["metadata_sha256"] == _sha256(meta_raw):
                return version
            raise RegistryError(f"version {version!r} is already registered with other weights")
        training_metrics = (meta.get("training") or {}).get("metrics") or {}
        entry = VersionInfo(
            version=version,
            stage="candidate",
            registered_at=utc_now(),
            sha256=sha,
            metadata_sha256=_sha256(meta_raw),
            metrics={**{k: training_metrics[k] for k in TRAINING_METRICS if k in training_metrics}, **(metrics or {})},
            features=tuple(meta.get("features") or ()),
            source=source if source is not None else str(directory.resolve()),
        ).to_dict()
        del entry["version"]
        # Files first, index last: until the index is written the copy is unreferenced.
        self._store.put_dir(f"{VERSIONS}/{version}", {WEIGHTS: weights, METADATA: meta_raw})
        index["versions"][version] = entry
        self._write_index(index)
        return version

    def _check_servable(self, version: str) -> None:
        """Download and verify ``version`` as a worker would; RegistryError if a worker would refuse it."""
        with tempfile.TemporaryDirectory(prefix="iotad-registry-check-") as tmp:
            try:
                self.fetch(version, tmp)
            except ArtifactError as exc:
                raise RegistryError(f"refusing to make {version!r} the champion: {exc}") from exc

    def promote(self, version: str, *, reason: str = "", verify: bool = True) -> str | None:
        """Make ``version`` the champion; the previous champion becomes ``retired``. Returns the previous one.

        Promoting the current champion is a no-op. A retired version may be promoted again. With
        ``verify`` the stored artifact is first downloaded and checked as :meth:`fetch` does, so a
        version the workers would refuse never becomes the champion.
        """
        index = self._read_index()
        entry = self._entry(index, version)
        lineage: builtins.list[str] = index["lineage"]
        previous = lineage[-1] if lineage else None
        if previous == version:
            return previous
        if verify:
            self._check_servable(version)
        now = utc_now()
        if previous is not None:
            prev = self._entry(index, previous)
            prev["stage"], prev["retired_at"] = "retired", now
        entry["stage"], entry["promoted_at"], entry["retired_at"] = "champion", now, None
        lineage.append(version)
        index["history"].append(
            {"action": "promote", "version": version, "previous": previous, "at": now, "reason": reason}
        )
        self._write_index(index)
        return previous

    def rollback(self, *, reason: str = "", verify: bool = True) -> str:
        """Retire the current champion and bring back the one before it; returns the restored version.

        With ``verify`` the restored version is checked first, as in :meth:`promote`.
        """
        index = self._read_index()
        lineage: builtins.list[str] = index["lineage"]
        if len(lineage) < 2:
            raise RegistryError("no previous champion to roll back to")
        if verify:
            self._check_servable(lineage[-2])
        now = utc_now()
        current = lineage.pop()
        restored = lineage[-1]
        cur = self._entry(index, current)
        cur["stage"], cur["retired_at"] = "retired", now
        back = self._entry(index, restored)
        back["stage"], back["promoted_at"], back["retired_at"] = "champion", now, None
        index["history"].append(
            {"action": "rollback", "version": restored, "previous": current, "at": now, "reason": reason}
        )
        self._write_index(index)
        return restored

    def set_metrics(self, version: str, metrics: Mapping[str, Any]) -> None:
        """Merge ``metrics`` into a version's recorded metrics (e.g. its score on a retraining slice)."""
        index = self._read_index()
        entry = self._entry(index, version)
        entry["metrics"] = {**(entry.get("metrics") or {}), **metrics}
        self._write_index(index)

    # ----------------------------------------------------------------------------- reports

    def write_report(self, report: Mapping[str, Any]) -> str:
        """Store a JSON report as ``reports/<UTC timestamp>-<version>.json``; returns its name.

        The version is ``report["version"]`` (``none`` when absent, e.g. no candidate was trained).
        """
        version = str(report.get("version") or "none")
        if not _VERSION_RE.match(version):
            version = "invalid"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{version}.json"
        self._store.write(
            f"{REPORTS}/{name}", (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode()
        )
        return name

    def reports(self) -> builtins.list[str]:
        """Report names, oldest first (the names start with their UTC timestamp)."""
        return [n for n in self._store.listdir(REPORTS) if n.endswith(".json") and not n.startswith(".")]

    def read_report(self, name: str) -> dict[str, Any]:
        if "/" in name or name.startswith("."):
            raise RegistryError(f"invalid report name {name!r}")
        try:
            report: dict[str, Any] = json.loads(self._store.read(f"{REPORTS}/{name}"))
        except FileNotFoundError:
            raise RegistryError(f"no report {name!r}") from None
        return report

    # ----------------------------------------------------------------------------- fetch

    def fetch(
        self, version: str, local_cache_dir: Path | str, *, expected_features: Sequence[str] | None = None
    ) -> Path:
        """A verified local copy of ``version``: ``<local_cache_dir>/<version>/``, ready for load_artifact.

        A copy already in the cache is reused when it still verifies. Otherwise both files are
        downloaded into a temporary directory, checked against the hashes in the index, loaded with
        :func:`~models.artifact.load_artifact` (weights hash, format, ``expected_features``) and only
        then renamed into place. Every failure — unknown version, storage error, partial or corrupt
        files — raises :class:`~models.artifact.ArtifactError` and leaves the cache as it was.
        """
        try:
            entry = self._entry(self._read_index(), version)
        except RegistryError as exc:
            raise ArtifactError(f"cannot fetch {version!r} from {self.url}: {exc}") from exc
        cache = Path(local_cache_dir)
        final = cache / check_version(version)
        if final.is_dir():
            try:
                self._verify_local(final, entry, expected_features)
                return final
            except ArtifactError:
                pass  # stale or damaged cached copy: download again
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=cache))
        try:
            for name in ARTIFACT_FILES:
                try:
                    data = self._store.read(f"{VERSIONS}/{version}/{name}")
                except Exception as exc:  # any storage backend error
                    raise ArtifactError(
                        f"cannot download {name} of {version!r} from {self.url}: {type(exc).__name__}: {exc}"
                    ) from exc
                (tmp / name).write_bytes(data)
            self._verify_local(tmp, entry, expected_features)
            tmp.chmod(0o755)
            if final.exists():
                shutil.rmtree(final)
            try:
                os.replace(tmp, final)
            except OSError:
                # Another process sharing the cache put a copy there first; use it if it verifies.
                self._verify_local(final, entry, expected_features)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _verify_local(self, directory: Path, entry: Mapping[str, Any], expected: Sequence[str] | None) -> None:
        """Check both files against the index, then load the artifact (raises ArtifactError)."""
        try:
            weights_sha = _sha256((directory / WEIGHTS).read_bytes())
            meta_sha = _sha256((directory / METADATA).read_bytes())
        except OSError as exc:
            raise ArtifactError(f"{directory}: incomplete artifact: {exc}") from exc
        if weights_sha != entry["sha256"]:
            raise ArtifactError(
                f"{directory / WEIGHTS}: sha256 {weights_sha[:12]} does not match the registry's "
                f"{str(entry['sha256'])[:12]} (corrupt or partial download)"
            )
        if meta_sha != entry["metadata_sha256"]:
            raise ArtifactError(f"{directory / METADATA}: does not match the registry's hash (corrupt or altered)")
        try:
            load_artifact(directory, expected_features=expected)
        except ArtifactError:
            raise
        except Exception as exc:  # e.g. a truncated safetensors header, a bad config
            raise ArtifactError(f"{directory}: cannot load: {type(exc).__name__}: {exc}") from exc


def open_registry(url: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> ModelRegistry:
    """A :class:`ModelRegistry` for a local directory or an fsspec URL."""
    return ModelRegistry(url, storage_options=storage_options)
