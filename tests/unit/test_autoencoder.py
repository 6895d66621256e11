"""The windowed BiLSTM autoencoder: shapes, causality of trailing windows, reproducibility, artifacts (and
their refusal by the streaming loader), and a tiny SKAB-shaped evaluation."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench import evaluate_windowed as ew
from bench.skab import TRAIN_ROWS
from models.artifact import ArtifactError, load_artifact
from models.autoencoder import (
    AutoencoderConfig,
    AutoencoderTrainConfig,
    BiLstmAutoencoder,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
    window_errors,
    window_scores,
    window_starts,
)
from models.training import TrainConfig, save_trained, train
from pipeline.cli import app

FEATURES = ("a", "b", "c")
TINY = AutoencoderTrainConfig(window=12, hidden=6, latent=3, batch_size=32, max_epochs=2, patience=2)


def series(n: int = 3, length: int = 300, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return [
        np.stack([np.sin(t / 6 + k), 5 + np.cos(t / 9), 0.01 * t], 1) + 0.1 * rng.standard_normal((length, 3))
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def trained():
    return train_autoencoder(series(), FEATURES, TINY, progress=False)


def test_shapes():
    model = BiLstmAutoencoder(AutoencoderConfig(n_features=3, window=12, hidden=5, latent=4, layers=2)).eval()
    x = torch.randn(7, 12, 3)
    assert model(x).shape == (7, 12, 3)
    assert model.encode(x).shape == (7, 4)
    assert torch.allclose(model.target(x).mean(dim=1), torch.zeros(7, 3), atol=1e-6)  # window-centred


def test_scores_have_a_row_per_row_and_nothing_before_the_first_full_window(trained):
    x = series(1, 100, seed=5)[0]
    err = window_errors(trained.model, trained.normaliser, x)
    assert err.shape == (100, 3)
    assert np.isnan(err[: TINY.window - 1]).all() and np.isfinite(err[TINY.window - 1 :]).all()
    np.testing.assert_allclose(window_scores(trained.model, trained.normaliser, x), err.mean(axis=1))


def test_the_score_of_row_t_does_not_depend_on_later_rows(trained):
    x = series(1, 120, seed=6)[0]
    t = 70
    changed = x.copy()
    changed[t + 1 :] = 50.0 + np.random.default_rng(1).standard_normal(changed[t + 1 :].shape)
    before = window_scores(trained.model, trained.normaliser, x)
    after = window_scores(trained.model, trained.normaliser, changed)
    np.testing.assert_array_equal(before[: t + 1], after[: t + 1])
    assert not np.allclose(before[t + 1 :], after[t + 1 :])


def test_a_lasting_level_shift_scores_only_while_the_step_is_in_the_window(trained):
    x = series(1, 200, seed=7)[0]
    shifted = x.copy()
    shifted[100:] += 3.0  # far outside the training levels, but the shape after it is as before
    base, sc = (window_scores(trained.model, trained.normaliser, v) for v in (x, shifted))
    w = TINY.window
    np.testing.assert_allclose(sc[100 + w - 1 :], base[100 + w - 1 :], atol=1e-5)
    assert (sc[100 : 100 + w - 1] > base[100 : 100 + w - 1]).any()


def test_training_is_seeded_and_learns():
    a = train_autoencoder(series(), FEATURES, TINY, progress=False)
    b = train_autoencoder(series(), FEATURES, TINY, progress=False)
    c = train_autoencoder(series(), FEATURES, replace(TINY, seed=1), progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    assert a.metrics["val_windows"] == 3 * (round(300 * 0.15) - TINY.window + 1)  # wholly inside the val part
    longer = train_autoencoder(series(), FEATURES, replace(TINY, max_epochs=8, patience=8), progress=False)
    assert longer.history[-1]["train_loss"] < longer.history[0]["train_loss"]


def test_windows_with_an_excluded_row_are_left_out():
    ex = np.zeros(20, bool)
    ex[7] = True
    starts = window_starts(20, 5, ex)
    assert starts.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15]
    assert window_starts(4, 5).size == 0


def test_artifact_round_trip_and_the_streaming_loader_refuses_it(trained, tmp_path):
    directory = save_autoencoder(trained, tmp_path / "ae", version="ae-1", data_description={"source": "test"})
    meta = json.loads((directory / "model.json").read_text())
    assert meta["streaming"] is False and meta["scorer"]["kind"] == "windowed" and meta["scorer"]["window"] == 12
    assert meta["model_class"] == "BiLstmAutoencoder" and meta["training"]["config"]["centre"] == "window"
    assert (directory / "model.safetensors").is_file()

    loaded = load_autoencoder(directory, expected_features=FEATURES)
    assert loaded.version == "ae-1" and loaded.features == FEATURES
    x = series(1, 80, seed=3)[0]
    np.testing.assert_array_equal(
        window_scores(loaded.model, loaded.normaliser, x), window_scores(trained.model, trained.normaliser, x)
    )
    # the worker's loader (pipeline/app.py) refuses it by name
    with pytest.raises(ArtifactError, match="windowed, non-streaming scorer"):
        load_artifact(directory)
    with pytest.raises(ArtifactError, match="feature set"):
        load_autoencoder(directory, expected_features=("x", "y", "z"))
    # and the autoencoder's loader refuses a forecaster
    forecaster = train(series(2, 200), FEATURES, TrainConfig(hidden=4, layers=1, max_epochs=1), progress=False)
    save_trained(forecaster, tmp_path / "lstm", version="f-1", data_description={})
    with pytest.raises(ArtifactError, match="not a BiLstmAutoencoder"):
        load_autoencoder(tmp_path / "lstm")


def _skab_like(root: Path) -> Path:
    """An anomaly-free file and two labelled files in SKAB's layout (semicolons, 1 s rows)."""
    rng = np.random.default_rng(0)

    def write(path: Path, values: np.ndarray, anomaly: np.ndarray | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stamps = np.datetime64("2020-03-09T10:00:00") + np.arange(len(values)).astype("timedelta64[s]")
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, delimiter=";")
            w.writerow(["datetime", *FEATURES, *(["anomaly", "changepoint"] if anomaly is not None else [])])
            for i, (ts, row) in enumerate(zip(stamps, values, strict=True)):
                labels = [] if anomaly is None else [int(anomaly[i]), int(np.diff(anomaly, prepend=0)[i] != 0)]
                w.writerow([str(ts).replace("T", " "), *row.tolist(), *labels])

    write(root / "data" / "anomaly-free" / "anomaly-free.csv", series(1, 600, seed=10)[0], None)
    for n in range(2):
        x = series(1, 640, seed=20 + n)[0]
        anomaly = np.zeros(640, np.int64)
        anomaly[480:560] = 1
        x[480:560, 0] += 4.0 * rng.standard_normal(80)  # a burst of vibration
        write(root / "data" / "valve1" / f"{n}.csv", x, anomaly)
    return root


def test_windowed_skab_evaluation_smoke(tmp_path, monkeypatch):
    data = _skab_like(tmp_path / "skab")
    tiny = ew.WindowedSkabConfig(model=replace(TINY, max_epochs=3, batch_size=64, max_batches_per_epoch=6))
    monkeypatch.setattr(ew, "WindowedSkabConfig", lambda: tiny)  # the CLI runs the default configuration
    out, res = tmp_path / "out", tmp_path / "res"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "skab",
            "--scorer",
            "bilstm-ae",
            "--data",
            str(data),
            "--json",
            "--out",
            str(out),
            "--no-plots",
            "--export-skab-results",
            str(res),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dataset"] == "skab" and summary["scorer"] == "bilstm-ae" and summary["files"] == 2
    for key in ("f1", "far", "mar", "nab_standard", "nab_low_fp", "nab_low_fn", "counts", "all_rows"):
        assert key in summary
    assert summary["counts"]["tp"] > 0  # the noise burst changes the window shape
    rows = list(csv.reader((res / "valve1" / "0.csv").open()))
    assert rows[0] == ["datetime", "anomaly", "changepoint"] and len(rows) == 641
    pred = np.array([int(r[1]) for r in rows[1:]])
    assert (pred[:TRAIN_ROWS] == 0).all()
    assert (out / "skab-bilstm-ae-model" / "model.safetensors").is_file()
    assert (out / "skab-bilstm-ae.json").is_file()


@pytest.mark.parametrize("args", [["nab", "--scorer", "bilstm-ae"], ["skab", "--scorer", "transformer"]])
def test_evaluate_refuses_a_scorer_it_does_not_have(args):
    assert CliRunner().invoke(app, ["evaluate", *args]).exit_code != 0


def test_train_cli_writes_a_windowed_artifact(tmp_path):
    out = tmp_path / "ae"
    args = ["train", "--model", "bilstm-ae", "--devices", "2", "--steps", "300", "--epochs", "1", "--hidden", "4"]
    result = CliRunner().invoke(app, [*args, "--layers", "1", "--window", "10", "--out", str(out), "--version", "t"])
    assert result.exit_code == 0, result.output
    assert load_autoencoder(out).model.config.window == 10
    with pytest.raises(ArtifactError, match="non-streaming"):
        load_artifact(out)
    assert CliRunner().invoke(app, ["train", "--model", "transformer", "--out", str(tmp_path / "x")]).exit_code != 0
