"""Per-device resampling to the model's fixed step: pure functions over a small state record.

Policy (documented in ARCHITECTURE.md, pinned by tests/unit/test_windowing.py):

* Buckets are right-closed and labelled by their end: bucket ``b`` holds readings with
  ``(b-1)*step < ts <= b*step`` and is stamped ``b*step``. A reading sent exactly on the step grid
  therefore closes its bucket at once (no added latency for well-behaved devices).
* A bucket's value is the per-sensor mean of its readings.
* The device's watermark is the largest timestamp it has sent. Bucket ``b`` closes when
  ``watermark >= b*step + grace``, or when the device has been idle (wall clock) for ``idle_flush``.
  Readings out of order within the grace period are merged into their (still open) bucket.
* A reading for a bucket that has already closed is *late*: it is not applied, the caller counts it
  and dead-letters it with reason ``late``.
* Gaps: when a bucket closes more than one step after the previous one, up to ``max_gap_steps``
  missing steps are forward-filled with the last value and marked ``observed=False`` (they advance
  the recurrent state but are never scored); a longer gap marks the next real step ``reset`` (the
  device starts warm-up again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True, slots=True)
class WindowConfig:
    step_ms: int = 1000
    grace_ms: int = 0
    max_gap_steps: int = 10
    idle_flush_ms: int = 2000


class Step(msgspec.Struct, frozen=True, gc=False):
    """One resampled step of one device, ready for the model. (A struct: one is made per reading.)"""

    ts_ms: int
    values: tuple[float, ...]
    observed: bool = True  # False: forward-filled gap step
    n_readings: int = 1
    reset: bool = False  # True: the gap before this step was too long; reset the device first


class DeviceWindow(msgspec.Struct, array_like=True, gc=False):
    """Resampling state of one device (serialised with the device's checkpointed state). One per device for
    as long as the worker owns it, holding no cycle: not tracked by the cyclic GC."""

    last_closed: int | None = None
    watermark: int = -(2**62)
    open: dict[int, tuple[list[float], int]] = msgspec.field(default_factory=dict)
    last_values: tuple[float, ...] | None = None
    last_seen_wall_ms: int = 0


def bucket_of(ts_ms: int, step_ms: int) -> int:
    return -(-ts_ms // step_ms)


def _emit(w: DeviceWindow, cfg: WindowConfig, b: int, sums: Sequence[float], n: int, out: list[Step]) -> None:
    """Close bucket ``b`` (the sums of its ``n`` readings): its gap steps, then the step itself."""
    values = tuple([s / n for s in sums])
    reset = False
    if w.last_closed is not None and w.last_values is not None:
        gap = b - w.last_closed - 1
        if gap > cfg.max_gap_steps:
            reset = True
        elif gap > 0:
            out.extend(
                Step((w.last_closed + k) * cfg.step_ms, w.last_values, observed=False, n_readings=0)
                for k in range(1, gap + 1)
            )
    out.append(Step(b * cfg.step_ms, values, True, n, reset))
    w.last_closed, w.last_values = b, values


def _close(w: DeviceWindow, cfg: WindowConfig, *, force: bool) -> list[Step]:
    out: list[Step] = []
    for b in sorted(w.open):
        if not force and b * cfg.step_ms + cfg.grace_ms > w.watermark:
            break
        sums, n = w.open.pop(b)
        _emit(w, cfg, b, sums, n, out)
    return out


def add_reading(
    w: DeviceWindow, ts_ms: int, values: tuple[float, ...], cfg: WindowConfig, now_wall_ms: int
) -> list[Step] | None:
    """Apply one reading; returns the steps it closed, or ``None`` if it is late."""
    b = bucket_of(ts_ms, cfg.step_ms)
    if w.last_closed is not None and b <= w.last_closed:
        return None
    if ts_ms > w.watermark:
        w.watermark = ts_ms
    w.last_seen_wall_ms = now_wall_ms
    if not w.open and b * cfg.step_ms + cfg.grace_ms <= w.watermark:
        # The common case (in order, on the grid): nothing else open and the reading closes its own bucket.
        out: list[Step] = []
        _emit(w, cfg, b, values, 1, out)
        return out
    slot = w.open.get(b)
    if slot is None:
        w.open[b] = (list(values), 1)
    else:
        sums, n = slot
        for i, v in enumerate(values):
            sums[i] += v
        w.open[b] = (sums, n + 1)
    return _close(w, cfg, force=False)


def flush_idle(w: DeviceWindow, cfg: WindowConfig, now_wall_ms: int) -> list[Step]:
    """Close every open bucket of a device idle for ``idle_flush_ms`` of wall time."""
    if w.open and now_wall_ms - w.last_seen_wall_ms >= cfg.idle_flush_ms:
        return _close(w, cfg, force=True)
    return []
