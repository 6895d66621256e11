"""The offline trainer: learning, reproducibility, time-ordered splits, masking, early stopping, artifacts."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from models.artifact import Normaliser, load_artifact
from models.forecaster import Forecaster, ForecasterConfig
from models.training import TrainConfig, TrainResult, evaluate_forecaster, save_trained, train

FEATURES = ("temperature", "vibration")
TINY = TrainConfig(
    hidden=12,
    layers=1,
    dropout=0.0,
    seq_len=32,
    batch_size=8,
    lr=1e-2,
    max_epochs=2,
    patience=3,
    warmup_steps_loss=4,
)


def sines(n_series: int = 4, length: int = 600, noise: float = 0.05, seed: int = 0) -> list[np.ndarray]:
    """Two periodic sensors per device with random phases plus white noise: learnable, unlike persistence."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    out = []
    for _ in range(n_series):
        p = rng.uniform(0, 2 * np.pi, 2)
        x = np.stack([20 + np.sin(2 * np.pi * t / 20 + p[0]), 0.5 * np.cos(2 * np.pi * t / 33 + p[1])], 1)
        out.append(x + noise * rng.standard_normal(x.shape))
    return out


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def val_prefixes(result: TrainResult, series: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Each series up to the end of its validation part, and where validation starts."""
    n_train, n_val = result.split["train"], result.split["val"]
    return [s[: a + b] for s, a, b in zip(series, n_train, n_val, strict=True)], list(n_train)


def test_trained_model_beats_persistence_on_held_out_test_data() -> None:
    series = sines()
    result = train(series, FEATURES, replace(TINY, max_epochs=4), progress=False)
    m = result.metrics
    assert not result.model.training
    assert m["epochs"] == len(result.history) == 4
    assert m["test_mse"] < 0.5 * m["persistence_test_mse"]
    assert m["val_mse"] < 0.5 * m["persistence_val_mse"]
    assert {"epoch", "train_loss", "val_mse", "lr", "seconds"} <= result.history[0].keys()


def test_same_seed_same_weights_different_seed_different_weights() -> None:
    series = sines(n_series=2, length=400)
    config = replace(TINY, layers=2, dropout=0.2)  # dropout draws from the (seeded) torch RNG too
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = train(series, FEATURES, config, progress=False)
    assert torch.equal(torch.rand(3), expected_next), "training must not disturb the caller's RNG"
    b = train(series, FEATURES, config, progress=False)
    c = train(series, FEATURES, replace(config, seed=1), progress=False)
    assert weights_equal(a.model, b.model)
    assert [h["val_mse"] for h in a.history] == [h["val_mse"] for h in b.history]
    assert not weights_equal(a.model, c.model)


def test_split_is_time_ordered_and_normaliser_sees_training_part_only() -> None:
    length = 400
    rng = np.random.default_rng(1)
    ramp = np.stack([np.arange(length, dtype=float), rng.standard_normal(length)], axis=1)
    config = replace(TINY, max_epochs=1, val_fraction=0.2, test_fraction=0.1)
    n_train, n_val, n_test = 280, 80, 40
    shifted = ramp.copy()
    shifted[n_train : n_train + n_val, 1] += 1e3  # validation part
    shifted[n_train + n_val :, 1] += 1e6  # test part
    result = train([ramp, shifted], FEATURES, config, progress=False)

    assert result.split["train"] == [n_train] * 2
    assert result.split["val"] == [n_val] * 2
    assert result.split["test"] == [n_test] * 2
    # Mean of a ramp over its first n_train steps: the training part is the start of the series.
    assert result.normaliser.mean[0] == pytest.approx((n_train - 1) / 2)
    expected = Normaliser.fit(np.concatenate([ramp[:n_train], shifted[:n_train]]))
    np.testing.assert_allclose(result.normaliser.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(result.normaliser.std, expected.std, rtol=1e-12)
    assert abs(result.normaliser.mean[1]) < 1.0


def test_early_stopping_restores_best_epoch() -> None:
    rng = np.random.default_rng(2)
    noise = [rng.standard_normal((300, 2)) for _ in range(3)]  # nothing to learn past the mean: val plateaus
    config = replace(TINY, lr=3e-2, max_epochs=30, patience=3, lr_patience=1)
    result = train(noise, FEATURES, config, progress=False)
    m, history = result.metrics, result.history

    assert m["stopped_early"]
    assert m["epochs"] == len(history) == m["best_epoch"] + config.patience < config.max_epochs
    vals = [h["val_mse"] for h in history]
    best = vals[int(m["best_epoch"]) - 1]
    assert best == min(vals)
    assert vals[-1] != best
    assert history[-1]["lr"] < config.lr, "the plateau schedule should have cut the LR"
    prefixes, starts = val_prefixes(result, noise)
    again = evaluate_forecaster(result.model, result.normaliser, prefixes, start=starts)["mse"]
    assert again == pytest.approx(best, rel=1e-6)
    assert m["val_mse"] == pytest.approx(best, rel=1e-6)


def test_masked_points_do_not_influence_training() -> None:
    clean = sines(n_series=2, length=400)
    rng = np.random.default_rng(3)
    mask = [rng.random(len(s)) < 0.05 for s in clean]
    outliers = [s.copy() for s in clean]
    missing = [s.copy() for s in clean]
    for s, o, n, m in zip(clean, outliers, missing, mask, strict=True):
        o[m] = s[m] + 1e4
        n[m, 0] = np.nan

    a = train(clean, FEATURES, TINY, mask=mask, progress=False)
    b = train(outliers, FEATURES, TINY, mask=mask, progress=False)
    c = train(missing, FEATURES, TINY, progress=False)  # non-finite rows are masked implicitly
    for other in (b, c):
        assert weights_equal(a.model, other.model)
        np.testing.assert_array_equal(a.normaliser.mean, other.normaliser.mean)
        for key in ("train_mse", "val_mse", "test_mse", "persistence_test_mse"):
            assert a.metrics[key] == other.metrics[key]
    assert a.split["excluded"] == [int(m.sum()) for m in mask]

    unmasked = train(outliers, FEATURES, TINY, progress=False)
    assert not weights_equal(a.model, unmasked.model)
    assert unmasked.normaliser.std[0] > 100 * a.normaliser.std[0]


def test_evaluate_forecaster_scores_the_requested_targets() -> None:
    model = Forecaster(ForecasterConfig(n_features=2, hidden=4, layers=1, dropout=0.0))
    identity = Normaliser(np.zeros(2), np.ones(2))
    ramp = np.repeat(np.arange(50.0)[:, None], 2, axis=1)  # persistence is off by exactly 1 each step
    full = evaluate_forecaster(model, identity, [ramp])
    assert full["targets"] == 49
    assert full["persistence_mse"] == pytest.approx(1.0)
    late = evaluate_forecaster(model, identity, [ramp, ramp], start=[40, 45])
    assert late["targets"] == 10 + 5
    mask = np.zeros(50, bool)
    mask[[0, 45, 46]] = True
    masked = evaluate_forecaster(model, identity, [ramp], start=40, mask=[mask])
    assert masked["targets"] == 10 - 2
    # Rows 45 and 46 are forward-filled with row 44, so the target at 47 is 3 steps away from its input.
    assert masked["persistence_mse"] == pytest.approx((7 * 1 + 9) / 8)


def test_batch_cap_and_progress_bar(monkeypatch, capsys) -> None:
    steps = 0
    adam_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        nonlocal steps
        steps += 1
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    config = replace(TINY, max_epochs=3, max_batches_per_epoch=2)
    result = train(sines(n_series=2, length=400), FEATURES, config, progress=True)
    assert steps == 2 * result.metrics["epochs"] == 6
    assert "val" in capsys.readouterr().out


def test_save_trained_round_trip(tmp_path) -> None:
    series = sines(n_series=2, length=300)
    config = replace(TINY, max_epochs=1, cell="gru")
    result = train(series, FEATURES, config, progress=False)
    data = {"source": "synthetic sines", "devices": 2}
    path = save_trained(result, tmp_path / "forecaster", version="test-1", data_description=data)

    art = load_artifact(path, expected_features=FEATURES)
    assert art.version == "test-1"
    assert art.features == FEATURES
    np.testing.assert_array_equal(art.normaliser.mean, result.normaliser.mean)
    np.testing.assert_array_equal(art.normaliser.std, result.normaliser.std)
    x = torch.from_numpy(result.normaliser.apply(series[0]))[None]
    with torch.no_grad():
        assert torch.equal(art.model(x)[0], result.model(x)[0])

    training = art.metadata["training"]
    assert training["config"] == asdict(config)
    assert training["metrics"]["best_epoch"] == result.metrics["best_epoch"]
    assert training["metrics"]["test_mse"] == result.metrics["test_mse"]
    assert training["data"] == data
    assert training["split"]["train"] == result.split["train"]
    assert len(training["history"]) == len(result.history)


@pytest.mark.parametrize(
    ("series", "message"),
    [
        ([np.zeros((100, 3))], "expected"),
        ([np.zeros((7, 2))], "too short"),
        ([np.full((100, 2), np.nan)], "no unmasked"),
    ],
)
def test_bad_input_is_rejected(series: list[np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(series, FEATURES, TINY, progress=False)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="fraction"):
        TrainConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="cell"):
        TrainConfig(cell="rnn")  # type: ignore[arg-type]
