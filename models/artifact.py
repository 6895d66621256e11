"""Model artifacts: weights as safetensors (never a pickle of code) plus a metadata JSON.

An artifact directory holds ``model.safetensors`` and ``model.json``. The metadata records the model
class and hyper-parameters, the feature names, the per-feature normalisation fitted on training data,
the training description and metrics, library versions, the git commit and the SHA-256 of the
weights. :func:`load_artifact` refuses an artifact whose hash or feature set does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.forecaster import Forecaster, ForecasterConfig

WEIGHTS = "model.safetensors"
METADATA = "model.json"
FORMAT = 1


class SavableModel(Protocol):
    """What :func:`save_artifact` writes: a module whose ``config.to_dict()`` rebuilds it."""

    @property
    def config(self) -> _ModelConfig: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


class _ModelConfig(Protocol):
    def to_dict(self) -> dict[str, object]: ...


class ArtifactError(ValueError):
    """The artifact is missing, corrupt, or does not fit the caller's features."""


@dataclass(frozen=True)
class Normaliser:
    """Per-feature affine normalisation fitted on training data only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Normaliser:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        std = flat.std(axis=0)
        return cls(flat.mean(axis=0), np.where(std > 1e-9, std, 1.0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def invert(self, z: np.ndarray) -> np.ndarray:
        return z * self.std + self.mean


@dataclass
class Artifact:
    model: Forecaster
    features: tuple[str, ...]
    normaliser: Normaliser
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_artifact(
    directory: Path,
    model: SavableModel,
    features: Sequence[str],
    normaliser: Normaliser,
    *,
    version: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact atomically: into a temporary sibling directory, then rename over."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are read by other users (containers)
    weights = tmp / WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),
        "features": list(features),
        "normalisation": {"mean": normaliser.mean.tolist(), "std": normaliser.std.tolist()},
        "library_versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "git_commit": _git_commit(),
        "sha256": _sha256(weights),
        **(extra or {}),
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    weights.chmod(0o644)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, directory)
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    """The metadata of the artifact in ``directory``; raises :class:`ArtifactError` when a file is missing
    or the metadata is not JSON."""
    directory = Path(directory)
    meta_path, weights = directory / METADATA, directory / WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{directory}: missing {METADATA} or {WEIGHTS}")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path}: not JSON: {exc}") from exc
    return meta


def verify_weights(directory: Path, meta: dict[str, Any], expected_features: Sequence[str] | None) -> tuple[str, ...]:
    """Check the weights' hash and the feature set against ``meta``; returns the features."""
    weights = Path(directory) / WEIGHTS
    digest = _sha256(weights)
    if digest != meta.get("sha256"):
        raise ArtifactError(f"{weights}: sha256 {digest[:12]} does not match metadata {str(meta.get('sha256'))[:12]}")
    features = tuple(meta["features"])
    if expected_features is not None and tuple(expected_features) != features:
        raise ArtifactError(f"feature set {list(features)} != expected {list(expected_features)}")
    return features


def normaliser_of(meta: dict[str, Any]) -> Normaliser:
    norm = meta["normalisation"]
    return Normaliser(np.asarray(norm["mean"], dtype=np.float64), np.asarray(norm["std"], dtype=np.float64))


def load_artifact(directory: Path, *, expected_features: Sequence[str] | None = None, device: str = "cpu") -> Artifact:
    """Load and verify a streaming forecaster's artifact; raises :class:`ArtifactError` with the reason.

    A windowed scorer's artifact (metadata ``"streaming": false``, e.g. the BiLSTM autoencoder of
    :mod:`models.autoencoder`) is refused by name: it scores a row from a window of rows around it, has
    no state to carry from reading to reading, and so cannot be served by the streaming detector.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    meta_path, weights = directory / METADATA, directory / WEIGHTS
    if meta.get("streaming") is False:
        raise ArtifactError(
            f"{directory}: {meta.get('model_class')} is a windowed, non-streaming scorer "
            f"({meta.get('scorer', {}).get('description', 'it scores whole windows of rows')}); the streaming "
            "detector and the worker serve only forecasters with carried state (load it with "
            "models.autoencoder.load_autoencoder for offline scoring)"
        )
    if meta.get("format") != FORMAT or meta.get("model_class") != Forecaster.__name__:
        raise ArtifactError(f"{meta_path}: unsupported format/model {meta.get('format')}/{meta.get('model_class')}")
    features = verify_weights(directory, meta, expected_features)
    model = Forecaster(ForecasterConfig(**meta["config"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise ArtifactError(f"{weights}: cannot load weights: {exc}") from exc
    model.to(device).eval()
    return Artifact(model, features, normaliser_of(meta), str(meta["version"]), meta)
