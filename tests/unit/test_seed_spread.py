"""`bench.evaluate.seed_spread`: the headline figures of runs that differ only in the training seed."""

from __future__ import annotations

import pytest

from bench.evaluate import seed_spread


def _nab(seed: int, standard: float, low_fp: float, low_fn: float, val: float) -> dict:
    return {
        "dataset": "nab",
        "standard": standard,
        "reward_low_FP_rate": low_fp,
        "reward_low_FN_rate": low_fn,
        "model": {"seed": seed, "val_mse": val},
    }


def test_median_and_range_of_each_figure_in_run_order():
    runs = [_nab(0, 76.69, 69.09, 81.32, 0.98), _nab(1, 76.92, 69.10, 81.47, 0.99), _nab(2, 76.74, 68.75, 81.35, 0.96)]
    spread = seed_spread(runs)
    assert spread["seeds"] == [0, 1, 2]
    assert spread["standard"] == {"values": [76.69, 76.92, 76.74], "median": 76.74, "min": 76.69, "max": 76.92}
    assert spread["reward_low_FP_rate"]["median"] == 69.09
    assert spread["reward_low_FN_rate"]["max"] == 81.47
    assert spread["val_mse"] == {"values": [0.98, 0.99, 0.96], "median": 0.98, "min": 0.96, "max": 0.99}


def test_skab_figures_and_an_even_number_of_runs():
    runs = [
        {
            "dataset": "skab",
            "f1": f1,
            "far": 12.9,
            "mar": 22.4,
            "nab_standard": cp,
            "model": {"seed": s, "val_mse": 0.44},
        }
        for s, (f1, cp) in enumerate([(0.8216, 36.2), (0.8211, 35.4)])
    ]
    spread = seed_spread(runs)
    assert set(spread) == {"seeds", "f1", "far", "mar", "nab_standard", "val_mse"}
    assert spread["f1"]["median"] == pytest.approx(0.82135)
    assert spread["nab_standard"]["min"] == 35.4
