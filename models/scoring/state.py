"""Per-slot state as flat float rows: what every stateful threshold part exports into a device's checkpoint
and restores from it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.scoring.core import Units


def _width(parts: list[np.ndarray]) -> int:
    """Floats per slot in export ``parts`` (each ``(B,)`` or ``(B, ...)``)."""
    return sum(math.prod(p.shape[1:]) for p in parts)


def _framed(n: int, *groups: list[np.ndarray]) -> list[np.ndarray]:
    """Export parts of ``groups`` for ``n`` slots, each group preceded by its width (a column)."""
    return [x for g in groups for x in (np.full(n, _width(g)), *g)]


class _Exports:
    """A per-slot state exported for many slots at once: :meth:`export_parts` gives its per-slot arrays in
    order, :meth:`export_many` one float64 row per slot (the same layout for every slot, written in one
    pass), :meth:`export` one slot's row as the list :meth:`restore` reads."""

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        return []

    def export_many(self, slots: np.ndarray) -> np.ndarray:
        parts = self.export_parts(slots)
        out = np.empty((len(slots), _width(parts)))
        o = 0
        for p in parts:
            k = math.prod(p.shape[1:])
            out[:, o : o + k] = p.reshape(len(slots), k)
            o += k
        return out

    def export(self, slot: int) -> list[float]:
        row: list[float] = self.export_many(np.array([slot], np.int64))[0].tolist()
        return row


class _Carried(_Exports):
    """Per-slot state that a model swap hands to the next detector (:meth:`transfer`) or keeps in place
    (:meth:`rescale`). ``ARRAYS`` names each per-slot array with its :meth:`Units.convert` kind: ``""`` for
    one without a feature axis, ``"free"`` for a unitless one with it."""

    ARRAYS: tuple[tuple[str, str], ...] = ()
    f = 0  # features; 0 until the member has seen an input

    def _features(self, f: int) -> None:
        """Size the feature axis (members with one override this)."""

    def transfer(self, src: Any, s: np.ndarray, d: np.ndarray, units: Units) -> None:
        """Rows ``s`` of ``src`` (a member of the same configuration) into rows ``d``, converted."""
        if src.f:
            self._features(src.f)
        for name, kind in self.ARRAYS:
            if kind and not src.f:
                continue  # a member that has seen no input has nothing on its feature axis
            getattr(self, name)[d] = units.convert(kind, getattr(src, name)[s])

    def rescale(self, units: Units) -> None:
        """Convert every slot's arrays to ``units``, in place."""
        if self.f:
            for name, kind in self.ARRAYS:
                units.convert(kind, getattr(self, name))
