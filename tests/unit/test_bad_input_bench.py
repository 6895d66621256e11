"""The bad-input benchmark's message mix, checked offline through the real Processor and default model:
every bad message (every kind) is dead-lettered with its expected reason, every valid reading scored once.
The live run is ``iotad bench bad-input`` (bench/bad_input.py)."""

from __future__ import annotations

import time
import zlib
from collections import Counter, defaultdict

import pytest

from bench.bad_input import ALL_KINDS, BadInputConfig, _kind_counts, build_messages
from connectors.simulator import aligned_now_ms
from pipeline.app import build_detector, build_processor
from pipeline.processor import Inbound
from pipeline.settings import Settings

# The reasons each kind may get (some kinds have variants, e.g. a huge string as device id or as a value).
EXPECTED = {
    "random_bytes": {"bad_json"},
    "truncated_json": {"bad_json"},
    "wrong_type": {"bad_schema"},
    "nan": {"bad_json", "bad_schema"},
    "infinity": {"bad_json", "bad_schema", "value_out_of_range"},
    "huge_number": {"value_out_of_range"},
    "huge_string": {"bad_device_id", "bad_schema"},
    "missing_fields": {"bad_schema"},
    "unknown_sensors": {"unknown_sensors"},
    "key_mismatch": {"key_mismatch"},
    "absurd_timestamp": {"timestamp_out_of_range", "bad_timestamp"},
    "oversized": {"oversized"},
    "empty_object": {"bad_schema"},
    "bad_device_id": {"bad_device_id"},
    "late_duplicate": {"late"},
    "late_out_of_order": {"late"},
    "clock_skew": {"timestamp_out_of_range"},
}


def test_kind_counts() -> None:
    counts = _kind_counts(BadInputConfig(malformed=10_000, oversized=8))
    assert set(counts) == set(ALL_KINDS) == set(EXPECTED)
    assert sum(counts.values()) == 10_000 and counts["oversized"] == 8
    assert min(v for k, v in counts.items() if k != "oversized") >= 10_000 // len(ALL_KINDS)


@pytest.mark.parametrize("seed", [0, 1])
def test_mix_through_the_processor(seed: int) -> None:
    cfg = BadInputConfig(devices=12, steps=20, malformed=600, oversized=2, seed=seed)
    # one end time for both: built "ending now", they differ when a step boundary passes between the calls
    end = aligned_now_ms(cfg.step_ms)
    msgs = build_messages(cfg, mixed=True, now_ms=end)
    clean = build_messages(cfg, mixed=False, now_ms=end)
    assert [m.value for m in msgs if m.kind == "valid"] == [m.value for m in clean]
    assert Counter(m.kind for m in msgs if m.kind != "valid") == Counter(_kind_counts(cfg))

    settings = Settings(step_ms=cfg.step_ms, warmup_steps=5, _env_file=None)  # type: ignore[call-arg]
    proc = build_processor(settings, build_detector(settings))
    offsets: Counter[int] = Counter()
    inbound, kinds = [], {}
    for m in msgs:
        p = zlib.crc32(m.key) % 4 if m.key else 0
        inbound.append(Inbound(m.key, m.value, "t", p, offsets[p]))
        kinds[(p, offsets[p])] = m.kind
        offsets[p] += 1
    scores, reasons = [], defaultdict(Counter)
    now = int(time.time() * 1000)
    for i in range(0, len(inbound), 97):
        res = proc.process(inbound[i : i + 97], now)
        scores.extend(res.scores)
        for d in res.dead:
            reasons[kinds[(d.partition, d.offset)]][d.reason] += 1
    assert "valid" not in reasons
    assert len({(r.device_id, r.ts_ms) for r in scores}) == len(scores) == cfg.readings
    for kind, n in _kind_counts(cfg).items():
        assert sum(reasons[kind].values()) == n, (kind, reasons[kind])
        assert set(reasons[kind]) <= EXPECTED[kind], (kind, reasons[kind])
