"""Everything torch: forecasters, the batched stateful detector, scoring, artifacts and training."""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
