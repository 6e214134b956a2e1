"""Evaluation metrics against scikit-learn and hand computations; calibration, bootstrap and comparisons."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, softmax
from scipy.stats import chi2
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, brier_score_loss, cohen_kappa_score, confusion_matrix, f1_score,
    log_loss, precision_score, recall_score, roc_auc_score,
)

from diffmed.errors import RunError
from diffmed.evaluation import (
    apply_temperature, bootstrap_ci, bootstrap_samples, choose_thresholds, classification_metrics,
    compare_runs, expected_calibration_error, fit_temperature, format_comparison, mcnemar_test,
    paired_bootstrap, predict, reliability_curve, resample_weights,
)

# Six images, three classes: one-vs-rest AUCs worked out by counting (positive, negative) score pairs.
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array([[.6, .3, .1], [.3, .4, .3], [.2, .5, .3], [.5, .3, .2], [.1, .2, .7], [.3, .3, .4]])
# class 0: positives .6 (beats 4 negatives) and .3 (beats .2 and .1, ties .3) -> 6.5 / 8
# class 1: positives .5 (beats 4) and .3 (beats .2, ties .3 twice)          -> 6 / 8
# class 2: positives .7 and .4 beat every negative                           -> 8 / 8
HAND_AUCS = [6.5 / 8, 6 / 8, 1.0]


def _synthetic(task: str, n: int, c: int, seed: int = 0, signal: float = 1.5):
    """Targets and probabilities of a moderately good model."""
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        y = (rng.random((n, c)) < 0.3).astype(float)
        return y, expit(rng.normal(size=(n, c)) + signal * (2 * y - 1))
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += signal
    return y, softmax(z, axis=1)


def _sklearn_single_label(y, p, pred):
    labels = list(range(p.shape[1]))
    return {
        "acc": accuracy_score(y, pred), "balanced_acc": balanced_accuracy_score(y, pred),
        "f1_macro": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
        "precision_macro": precision_score(y, pred, labels=labels, average="macro", zero_division=0),
        "recall_macro": recall_score(y, pred, labels=labels, average="macro", zero_division=0),
        "kappa": cohen_kappa_score(y, pred), "nll": log_loss(y, p, labels=labels),
        "brier": brier_score_loss(y, p, labels=labels),
    }


# ------------------------------------------------------------------------------------------ metrics
def test_binary_matches_sklearn_and_medmnist():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([.1, .6, .7, .4, .9, .2, .5, .3])
    p = np.stack([1 - p1, p1], axis=1)
    r = classification_metrics("binary", y, p)
    pred = (p1 > 0.5).astype(int)  # MedMNIST: strictly greater than 0.5 (0.5 itself is negative)
    assert r["auc"] == pytest.approx(roc_auc_score(y, p1))
    for key, expected in _sklearn_single_label(y, p, pred).items():
        assert r[key] == pytest.approx(expected), key
    assert r["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert r["per_class"]["support"] == [4, 4]
    assert r["per_class"]["auc"] == pytest.approx([roc_auc_score(y, p1)] * 2)


def test_multiclass_auc_is_mean_one_vs_rest_by_hand():
    r = classification_metrics("multiclass", Y3, P3)
    assert r["per_class"]["auc"] == pytest.approx(HAND_AUCS)
    assert r["auc"] == pytest.approx(sum(HAND_AUCS) / 3)
    assert r["auc"] == pytest.approx(np.mean([roc_auc_score(Y3 == c, P3[:, c]) for c in range(3)]))
    assert r["acc"] == pytest.approx(4 / 6)  # argmax predictions [0, 1, 1, 0, 2, 2]
    for key, expected in _sklearn_single_label(Y3, P3, P3.argmax(1)).items():
        assert r[key] == pytest.approx(expected), key
    assert r["confusion_matrix"] == confusion_matrix(Y3, P3.argmax(1)).tolist()
    assert r["notes"] == []


def test_class_missing_from_targets_gets_nan_auc_and_a_note():
    y = np.array([0, 0, 1, 1, 0, 1])
    r = classification_metrics("multiclass", y, P3, class_names=["a", "b", "c"])
    assert np.isnan(r["per_class"]["auc"][2])
    assert r["auc"] == pytest.approx(np.mean([roc_auc_score(y == c, P3[:, c]) for c in (0, 1)]))
    assert len(r["notes"]) == 1 and "'c'" in r["notes"][0]


def test_ordinal_adds_quadratic_kappa():
    y, p = _synthetic("ordinal", 200, 5, seed=3)
    r = classification_metrics("ordinal", y, p)
    pred = p.argmax(1)
    assert r["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert r["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert "kappa_quadratic" not in classification_metrics("multiclass", y, p)


def test_multilabel_matches_per_label_sklearn_with_mask():
    y, p = _synthetic("multilabel", 120, 4, seed=1)
    mask = (np.random.default_rng(2).random(y.shape) < 0.8).astype(float)
    thresholds = np.array([0.5, 0.3, 0.6, 0.5])
    r = classification_metrics("multilabel", y, p, thresholds=thresholds, mask=mask)
    pred = p > thresholds
    cols = [(y[m > 0, c], p[m > 0, c], pred[m > 0, c]) for c, m in enumerate(mask.T)]
    assert r["acc"] == pytest.approx(np.mean([accuracy_score(t, d) for t, _, d in cols]))
    assert r["auc"] == pytest.approx(np.mean([roc_auc_score(t, s) for t, s, _ in cols]))
    assert r["f1_macro"] == pytest.approx(np.mean([f1_score(t, d, zero_division=0) for t, _, d in cols]))
    assert r["balanced_acc"] == pytest.approx(np.mean([balanced_accuracy_score(t, d) for t, _, d in cols]))
    assert r["kappa"] == pytest.approx(np.mean([cohen_kappa_score(t, d) for t, _, d in cols]))
    assert r["confusion_matrix"][1] == confusion_matrix(cols[1][0], cols[1][2]).tolist()
    keep = mask.ravel() > 0
    assert r["brier"] == pytest.approx(brier_score_loss(y.ravel()[keep], p.ravel()[keep]))
    assert r["per_class"]["support"] == [int(t.sum()) for t, _, _ in cols]


def test_multilabel_unmasked_matches_sklearn_macro():
    y, p = _synthetic("multilabel", 80, 3, seed=4)
    r = classification_metrics("multilabel", y, p)
    assert r["f1_macro"] == pytest.approx(f1_score(y, p > 0.5, average="macro", zero_division=0))
    assert r["auc"] == pytest.approx(roc_auc_score(y, p, average="macro"))


@pytest.mark.parametrize("task, y, p, kwargs", [
    ("triage", [0, 1], [[.5, .5], [.5, .5]], {}),
    ("multiclass", [0, 1, 2], [[.5, .5], [.5, .5]], {}),
    ("multiclass", [0, 5], [[.5, .5], [.5, .5]], {}),
    ("binary", [0, 1], [[.3, .3, .4], [.3, .3, .4]], {}),
    ("multilabel", [[0, 1]], [[.5, .5]], {"mask": [[1, 1, 1]]}),
    ("multilabel", [[0, 1]], [[.5, .5]], {"thresholds": [.5, .5, .5]}),
])
def test_bad_input_raises_value_error(task, y, p, kwargs):
    with pytest.raises(ValueError):
        classification_metrics(task, np.array(y), np.array(p), **kwargs)


# --------------------------------------------------------------------------------------- calibration
def _calibration_data(n: int = 20000, sharpen: float = 1.0, seed: int = 0):
    """Labels drawn from softmax(z); the model reports softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, 4))
    q = softmax(z, axis=1)
    y = (q.cumsum(1) > rng.random((n, 1))).argmax(1)
    return y, z, softmax(sharpen * z, axis=1)


def test_ece_small_when_calibrated_large_when_overconfident():
    y, _, calibrated = _calibration_data()
    _, _, overconfident = _calibration_data(sharpen=3.0)
    assert expected_calibration_error(y, calibrated) < 0.02
    assert expected_calibration_error(y, overconfident) > 0.15


def test_ece_by_hand_and_reliability_curve():
    y = np.array([0, 1, 1, 0])
    p = np.array([[.8, .2], [.8, .2], [.2, .8], [.2, .8]])  # confidence 0.8 each, half right
    assert expected_calibration_error(y, p, task="binary") == pytest.approx(0.3)
    curve = reliability_curve(y, p, n_bins=10, task="binary")
    assert curve["count"].sum() == 4 and curve["count"][7] == 4  # 0.8 falls in (0.7, 0.8]
    assert curve["accuracy"][7] == pytest.approx(0.5) and curve["confidence"][7] == pytest.approx(0.8)
    assert np.isnan(curve["accuracy"][0])


def test_temperature_recovers_known_value_and_lowers_nll():
    y, z, _ = _calibration_data(n=8000, seed=1)
    logits = 2.5 * z  # overconfident by a factor T = 2.5
    t = fit_temperature(logits, y, "multiclass")
    assert t == pytest.approx(2.5, rel=0.1)
    before = log_loss(y, apply_temperature(logits, 1.0, "multiclass"))
    assert log_loss(y, apply_temperature(logits, t, "multiclass")) < before - 0.05


def test_temperature_multilabel_uses_masked_bce():
    rng = np.random.default_rng(5)
    z = rng.normal(scale=1.5, size=(6000, 3))
    y = (rng.random(z.shape) < expit(z)).astype(float)
    mask = np.ones_like(y)
    mask[:, 2] = 0
    y[:, 2] = 1 - y[:, 2]  # garbage that the mask must hide
    assert fit_temperature(2.0 * z, y, "multilabel", mask=mask) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError):
        apply_temperature(z, 0.0, "multilabel")


def test_thresholds_maximise_f1_on_constructed_case():
    pos, neg = [.3, .35, .4], [.1, .2, .32]
    y = np.array([[1]] * 3 + [[0]] * 3, dtype=float)
    p = np.array([[s] for s in pos + neg])
    t = choose_thresholds(y, p)
    # positives above a cut between .2 and .3: TP 3, FP 1 -> F1 6/7, the best any cut achieves
    assert t[0] == pytest.approx(0.25)
    assert classification_metrics("multilabel", y, p, thresholds=t)["f1_macro"] == pytest.approx(6 / 7)
    best = max(f1_score(y[:, 0], p[:, 0] > c) for c in np.r_[0.0, p[:, 0]] - 1e-9)
    assert best == pytest.approx(6 / 7)


def test_thresholds_default_for_label_without_positives():
    y = np.array([[1, 0], [0, 0], [1, 0]], dtype=float)
    p = np.array([[.9, .2], [.1, .7], [.6, .4]])
    assert choose_thresholds(y, p)[1] == 0.5


# ----------------------------------------------------------------------------------------- bootstrap
@pytest.mark.parametrize("task, c", [("binary", 2), ("multiclass", 4), ("ordinal", 3), ("multilabel", 3)])
def test_vectorised_bootstrap_matches_sklearn_on_each_resample(task, c):
    y, p = _synthetic(task, 60, c, seed=7)
    mask = (np.random.default_rng(1).random(y.shape) < 0.85) if task == "multilabel" else None
    names = ["acc", "balanced_acc", "f1_macro", "precision_macro", "recall_macro", "auc", "kappa"]
    names += ["kappa_quadratic"] if task == "ordinal" else []
    samples = bootstrap_samples(task, y, p, names, n_boot=5, seed=3, mask=mask)
    weights = next(resample_weights(len(y), 5, 3))
    for b, w in enumerate(weights.astype(int)):
        idx = np.repeat(np.arange(len(y)), w)
        ref = classification_metrics(task, y[idx], p[idx], mask=None if mask is None else mask[idx])
        for name in names:
            assert samples[name][b] == pytest.approx(ref[name]), (name, b)


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    small = bootstrap_ci("multiclass", *_synthetic("multiclass", 150, 3, seed=2), n_boot=500)
    large = bootstrap_ci("multiclass", *_synthetic("multiclass", 3000, 3, seed=2), n_boot=500)
    for name, ci in small.items():
        assert ci["low"] <= ci["value"] <= ci["high"], name
        assert large[name]["high"] - large[name]["low"] < 0.6 * (ci["high"] - ci["low"]), name
        assert ci["n_dropped"] == 0


def test_bootstrap_is_seeded_and_counts_undefined_resamples():
    y = np.array([0] * 9 + [1])
    p = np.stack([np.linspace(.9, .1, 10), np.linspace(.1, .9, 10)], axis=1)
    a, b = (bootstrap_ci("binary", y, p, metrics=("auc",), n_boot=300, seed=11) for _ in range(2))
    assert a == b
    assert 0 < a["auc"]["n_dropped"] < 300  # resamples without the single positive have no AUC
    with pytest.raises(ValueError):
        bootstrap_ci("binary", y, p, metrics=("kappa_quadratic",))


def test_bootstrap_is_fast():
    y, p = _synthetic("multiclass", 1000, 5)
    start = time.perf_counter()
    bootstrap_ci("multiclass", y, p, n_boot=1000)
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------------------- comparisons
def _pairs(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    """Targets and two prediction vectors with b (A right, B wrong) and c (A wrong, B right) pairs."""
    y = np.zeros(b + c + both_right + both_wrong, dtype=int)
    a = np.r_[np.zeros(b), np.ones(c), np.zeros(both_right), np.ones(both_wrong)].astype(int)
    bb = np.r_[np.ones(b), np.zeros(c), np.zeros(both_right), np.ones(both_wrong)].astype(int)
    return y, a, bb


def test_mcnemar_exact_matches_hand_binomial():
    r = mcnemar_test(*_pairs(2, 8))
    hand = 2 * sum(math.comb(10, k) for k in range(3)) / 2 ** 10  # two-sided binomial(10, 1/2) at <= 2
    assert (r["b"], r["c"]) == (2, 8)
    assert r["p_value"] == pytest.approx(hand) == pytest.approx(112 / 1024)


def test_mcnemar_chi2_with_continuity_correction():
    r = mcnemar_test(*_pairs(30, 10))
    assert r["statistic"] == pytest.approx((abs(30 - 10) - 1) ** 2 / 40)
    assert r["p_value"] == pytest.approx(chi2.sf(r["statistic"], 1))


def test_mcnemar_multilabel_flattens_and_masks():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    a = np.array([[1, 0], [0, 1], [0, 1]])
    b = np.array([[0, 0], [1, 1], [0, 0]])
    mask = np.array([[1, 1], [1, 1], [1, 0]])
    r = mcnemar_test(y, a, b, mask)
    assert (r["b"], r["c"]) == (2, 0)


def test_paired_bootstrap_detects_better_model_and_not_identical_ones():
    rng = np.random.default_rng(0)
    y, good = _synthetic("binary", 400, 2, seed=8, signal=2.5)
    noisy = softmax(np.log(good) + rng.normal(scale=2.0, size=good.shape), axis=1)
    r = paired_bootstrap("binary", y, good, noisy, metric="auc", n_boot=500)
    assert r["diff"] > 0 and r["low"] > 0 and r["p_value"] < 0.05
    same = paired_bootstrap("binary", y, good, good, metric="auc", n_boot=500)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def _write_run(run_dir, y, probs, names, ids, task="multiclass"):
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.json").write_text(json.dumps({"method": "baseline", "task": task,
                                                              "class_names": names}))
    df = pd.DataFrame({"id": ids, "target": y, "pred": probs.argmax(1), "confidence": probs.max(1)})
    for i, n in enumerate(names):
        df[f"prob_{n}"] = probs[:, i]
    df.to_csv(run_dir / "predictions.csv", index=False)


def test_compare_runs_reports_and_checks_test_ids(tmp_path):
    names = ["benign", "malignant", "normal"]
    y, good = _synthetic("multiclass", 300, 3, seed=1, signal=3.0)
    _, weak = _synthetic("multiclass", 300, 3, seed=2, signal=0.3)
    ids = [f"img_{i:04d}.png" for i in range(300)]
    _write_run(tmp_path / "a", y, good, names, ids)
    _write_run(tmp_path / "b", y, weak, names, ids)
    r = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=300)
    assert set(r["metrics"]) == {"auc", "f1_macro", "acc", "balanced_acc"}
    assert r["metrics"]["auc"]["diff"] > 0 and r["metrics"]["auc"]["p_value"] < 0.05
    assert r["mcnemar"]["b"] > r["mcnemar"]["c"] and r["mcnemar"]["p_value"] < 0.05
    assert r["markdown"] == format_comparison(r) and "| auc |" in r["markdown"]
    _write_run(tmp_path / "c", y, weak, names, ids[::-1])
    with pytest.raises(RunError, match=r"(?s)runs .*a and .*c"):
        compare_runs(tmp_path / "a", tmp_path / "c")


def test_predict_rules():
    p = np.array([[.5, .5], [.4, .6]])
    assert predict("binary", p).tolist() == [0, 1]
    assert predict("binary", p, thresholds=0.55).tolist() == [0, 1]
    with pytest.raises(ValueError):
        predict("multiclass", p, thresholds=0.5)


def test_class_bias_recovers_the_prior_or_leaves_it_out_when_balanced():
    from diffmed.evaluation.metrics import fit_class_bias

    y = np.array([0] * 300 + [1] * 100)  # 3:1, and logits that say nothing
    b = fit_class_bias(np.zeros((400, 2)), y, "binary")
    assert b[0] - b[1] == pytest.approx(np.log(3), abs=1e-4) and b.sum() == pytest.approx(0)
    assert np.abs(fit_class_bias(np.zeros((400, 2)), y, "binary", balanced=True)).max() < 1e-4
    shifted = np.tile([0.0, 2.0], (400, 1))  # a scorer that favours class 1 by 2 for every image
    assert fit_class_bias(shifted, y, "binary", balanced=True) == pytest.approx([1.0, -1.0], abs=1e-4)
    with pytest.raises(ValueError, match="single-label"):
        fit_class_bias(np.zeros((4, 2)), np.zeros((4, 2)), "multilabel")
