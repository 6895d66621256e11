"""bench/state_memory.py stays runnable, and a device's state stays under the 4 KiB of the reliability goal."""

from __future__ import annotations

from bench.state_memory import measure


def test_default_state_per_device_is_under_4_kib() -> None:
    run = measure(1024, "static")  # exactly the detector's initial capacity: no spare slots counted
    assert run["devices"] == run["capacity"] == 1024
    assert 0 < run["torch_state_bytes"] < run["traced_bytes"] < 4096
    assert 0 < run["checkpoint_bytes"] < run["traced_bytes"]


def test_spare_capacity_is_charged_to_the_devices_present() -> None:
    few, full = measure(256, "static"), measure(1024, "static")
    assert few["capacity"] == full["capacity"] == 1024
    assert few["torch_state_bytes"] == 4 * full["torch_state_bytes"]
