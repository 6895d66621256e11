"""`iotad evaluate` end to end on a few real NAB / SKAB series (small subsets, a few seconds each).

The subsets are symlinked into a temporary dataset root; nothing is copied into the repository."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench import evaluate as ev
from bench import nab as nabscore
from bench import skab
from bench.skab import TRAIN_ROWS
from models.detector import Detector
from pipeline.cli import app

NAB = ev.DEFAULT_NAB
SKAB = ev.DEFAULT_SKAB
NAB_FILES = (
    "realAdExchange/exchange-3_cpc_results.csv",
    "realTraffic/speed_7578.csv",
    "artificialNoAnomaly/art_noisy.csv",
)
SKAB_FILES = ("valve1/0.csv", "other/9.csv")


def _nab_subset(root: Path) -> Path:
    if not (NAB / "labels" / "combined_windows.json").is_file():
        pytest.skip("NAB dataset not available")
    for sub in ("labels", "config"):
        shutil.copytree(NAB / sub, root / sub)
    for name in NAB_FILES:
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).symlink_to(NAB / "data" / name)
    return root


def _skab_subset(root: Path) -> Path:
    if not (SKAB / "data" / "anomaly-free" / "anomaly-free.csv").is_file():
        pytest.skip("SKAB dataset not available")
    for name in ("anomaly-free/anomaly-free.csv", *SKAB_FILES):
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).symlink_to(SKAB / "data" / name)
    return root


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_evaluate_nab_cli_on_three_series(tmp_path):
    data = _nab_subset(tmp_path / "nab")
    out, res = tmp_path / "out", tmp_path / "results"
    result = CliRunner().invoke(
        app, ["evaluate", "nab", "--data", str(data), "--json", "--out", str(out), "--export-nab-results", str(res)]
    )
    assert result.exit_code == 0, result.output
    summary = _last_json(result.stdout)
    assert summary["dataset"] == "nab" and summary["series"] == 3
    for profile in ("standard", "reward_low_FP_rate", "reward_low_FN_rate"):
        assert -100 <= summary[profile] <= 100
    assert len(summary["skipped"]) == 55  # every other key of the label file: CSV missing here
    assert len(list((out / "nab").glob("*.png"))) == 3

    # The exported results are NAB's layout and re-score to the same figures with the same thresholds.
    series, _ = nabscore.load_corpus(data)
    scores = []
    for s in series:
        path = res / "iotad" / s.category / f"iotad_{Path(s.name).name}"
        rows = list(csv.DictReader(path.open()))
        assert [r["timestamp"] for r in rows] == s.timestamps
        assert [int(r["label"]) for r in rows] == s.labels().tolist()
        sc = np.array([float(r["anomaly_score"]) for r in rows])
        assert ((sc >= 0) & (sc <= 1)).all()
        assert (sc[: s.probation] < 1).any()
        scores.append(sc)
    again = nabscore.score_corpus(series, scores)
    for profile, r in again.items():
        assert r.threshold == summary["thresholds"][profile]
        assert r.score is not None and round(r.score, 2) == summary[profile]


def test_the_harness_steps_all_series_together_through_the_detector(tmp_path, monkeypatch):
    data = _nab_subset(tmp_path / "nab")
    batches: list[int] = []
    real_step = Detector.step

    def spy(self, slots, x, observed=None, context=None):
        batches.append(len(slots))
        return real_step(self, slots, x, observed, context)

    monkeypatch.setattr(Detector, "step", spy)
    summary = ev.run_nab(data, out=tmp_path / "out", plots=False)
    lengths = sorted(len(s.values) for s in nabscore.load_corpus(data)[0])
    assert len(batches) == lengths[-1]  # one batched step per time index
    assert batches[0] == 3 and batches[-1] == 1  # all series while they last
    assert sum(batches) == sum(lengths)
    again = ev.run_nab(data, out=tmp_path / "out2", plots=False)  # seeded: reproducible
    assert {k: summary[k] for k in ("standard", "thresholds")} == {k: again[k] for k in ("standard", "thresholds")}


def test_evaluate_skab_cli_on_two_files(tmp_path):
    data = _skab_subset(tmp_path / "skab")
    out, res = tmp_path / "out", tmp_path / "results"
    result = CliRunner().invoke(
        app, ["evaluate", "skab", "--data", str(data), "--json", "--out", str(out), "--export-skab-results", str(res)]
    )
    assert result.exit_code == 0, result.output
    summary = _last_json(result.stdout)
    assert summary["dataset"] == "skab" and summary["files"] == 2
    assert 0 <= summary["f1"] <= 1 and 0 <= summary["far"] <= 100 and 0 <= summary["mar"] <= 100
    assert summary["nab_standard"] <= 100
    assert len(list((out / "skab").glob("*.png"))) == 2
    preds, cp_preds = {}, {}
    for name in SKAB_FILES:
        rows = list(csv.reader((res / name).open()))
        data_rows = list(csv.reader((data / "data" / name).open(), delimiter=";"))
        assert rows[0] == ["datetime", "anomaly", "changepoint"]
        assert [r[0] for r in rows[1:]] == [r[0] for r in data_rows[1:]]
        pred = np.array([int(r[1]) for r in rows[1:]])
        cp = np.array([int(r[2]) for r in rows[1:]])
        assert set(pred.tolist()) <= {0, 1} and set(cp.tolist()) <= {0, 1}
        assert (pred[:TRAIN_ROWS] == 0).all() and (cp[:TRAIN_ROWS] == 0).all()  # the training part: no predictions
        preds[name] = pred
        cp_preds[name] = np.cumsum(cp) % 2  # the detections whose |diff| the changepoints are
    # the exported files give exactly the reported figures: outliers at one alarm level, changepoints at another
    files = skab.load_skab(data)[1]
    order = [f"{f.name}.csv" for f in files]
    assert skab.summarise(files, [preds[n] for n in order], [cp_preds[n] for n in order]) == {
        k: summary[k] for k in ("f1", "far", "mar", "nab_standard", "nab_low_fp", "nab_low_fn", "counts", "all_rows")
    }
    curve = {c["alarm"]: c for c in summary["operating_curve"]}
    assert curve[summary["alarms"]["outlier"]]["f1"] == summary["f1"]
    assert curve[summary["alarms"]["changepoint"]]["nab_standard"] == summary["nab_standard"]
    # the valve closure of valve1/0 is found
    assert summary["counts"]["tp"] > 0


def test_evaluate_rejects_an_unknown_dataset():
    result = CliRunner().invoke(app, ["evaluate", "ucr"])
    assert result.exit_code != 0


def test_evaluate_repeats_the_run_over_training_seeds(tmp_path):
    data = _skab_subset(tmp_path / "skab")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["evaluate", "skab", "--data", str(data), "--json", "--out", str(out), "--cell", "gru", "--seeds", "2"]
    )
    assert result.exit_code == 0, result.output
    summary = _last_json(result.stdout)
    assert summary["model"]["cell"] == "gru" and summary["model"]["seed"] == 0
    spread = summary["seed_spread"]
    assert spread["seeds"] == [0, 1]
    for key in ("f1", "far", "mar", "nab_standard", "val_mse"):
        values = spread[key]["values"]
        assert len(values) == 2 and spread[key]["min"] <= spread[key]["median"] <= spread[key]["max"]
    assert spread["f1"]["values"][0] == summary["f1"]  # the headline is seed 0's run
    assert spread["val_mse"]["values"][0] == summary["model"]["val_mse"]
    # seed 1 is a run of its own (another model), the same as running it directly, and leaves no plots
    assert spread["val_mse"]["values"][0] != spread["val_mse"]["values"][1]
    again = ev.run_skab(data, ev.SkabConfig(model=ev.ModelConfig(cell="gru", seed=1)), plots=False)
    assert [again["f1"], again["model"]["val_mse"]] == [spread["f1"]["values"][1], spread["val_mse"]["values"][1]]
    assert len(list((out / "skab").glob("*.png"))) == 2 and (out / "seed-1" / "skab.json").is_file()
    assert "seeds 0-1: median" in result.output  # the table (on stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["--cell", "rnn"],
        ["--seeds", "0"],
        ["--scorer", "bilstm-ae", "--seeds", "2"],
        ["--scorer", "bilstm-ae", "--cell", "gru"],
    ],
)
def test_evaluate_rejects_bad_seed_and_cell_options(args):
    result = CliRunner().invoke(app, ["evaluate", "skab", *args])
    assert result.exit_code == 2, result.output
