"""Test-set metrics, calibration, thresholds and bootstrap confidence intervals (numpy + scikit-learn).

Conventions follow the MedMNIST evaluator so numbers are comparable with published tables:

* ``y_true`` is (N,) int class indices for "binary", "multiclass" and "ordinal", or (N, C) 0/1 for
  "multilabel", where an optional (N, C) ``mask`` marks entries to ignore with 0.
* ``probs`` is (N, C): softmax probabilities (binary has two columns) or per-label sigmoids.
* Binary predicts class 1 when ``probs[:, 1] > 0.5``; multiclass/ordinal predict the argmax; multilabel
  predicts ``probs > thresholds`` (0.5 by default).
* AUC is ``roc_auc_score(y, probs[:, 1])`` for binary and otherwise the plain mean of one-vs-rest AUCs
  per class/label; classes with one value in ``y_true`` get NaN and are left out of the mean.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit, log_softmax, logit, softmax
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, brier_score_loss, cohen_kappa_score, confusion_matrix,
    log_loss, precision_recall_curve, precision_recall_fscore_support, roc_auc_score,
)

TASKS = ("binary", "multiclass", "ordinal", "multilabel")
BOOTSTRAP_METRICS = ("acc", "balanced_acc", "f1_macro", "precision_macro", "recall_macro", "auc",
                     "kappa", "kappa_quadratic")
_EPS = 1e-12
_CELLS_PER_CHUNK = 4_000_000
"""Bootstrap weights are built this many (resample, image) cells at a time to bound memory."""


# ----------------------------------------------------------------------------------------- inputs
def check_task(task: str) -> str:
    """Return ``task`` if diffmed knows it, else raise ValueError naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def _validate(task: str, y_true: Any, probs: Any, mask: Any = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Arrays in the shapes the module expects (masked multilabel targets set to 0), or ValueError."""
    check_task(task)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or (p.shape[1] < 2 and task != "multilabel"):
        raise ValueError(f"probs must be (N, C) with C >= 2 for {task}; got shape {p.shape}")
    if task == "multilabel":
        return _validate_multilabel(np.asarray(y_true, dtype=np.float64), p, mask)
    y = np.asarray(y_true)
    if y.shape != (len(p),):
        raise ValueError(f"y_true must be (N,) class indices with N={len(p)}; got shape {y.shape}")
    if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true holds class {y.max()} but probs has only {p.shape[1]} columns")
    if task == "binary" and p.shape[1] != 2:
        raise ValueError(f"binary probs must have 2 columns (softmax); got {p.shape[1]}")
    return y, p, None


def _validate_multilabel(y: np.ndarray, p: np.ndarray, mask: Any
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if y.shape != p.shape:
        raise ValueError(f"multilabel y_true {y.shape} and probs {p.shape} must have the same shape")
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64)
    if m.shape != y.shape:
        raise ValueError(f"mask {m.shape} must have the shape of y_true {y.shape}")
    m = (m > 0) & np.isfinite(y)
    y = np.where(m, y, 0.0)
    if np.any((y != 0) & (y != 1)):
        raise ValueError("multilabel y_true must be 0/1 where the mask is 1")
    return y.astype(np.int64), p, m.astype(np.float64)


def _as_thresholds(task: str, thresholds: Any, n_labels: int) -> np.ndarray:
    """Per-label decision thresholds from None (0.5), a scalar, or one value per label."""
    if thresholds is None:
        return np.full(n_labels, 0.5)
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if t.size not in (1, n_labels):
        raise ValueError(f"{task} thresholds must be a scalar or have {n_labels} entries; got {t.size}")
    return np.broadcast_to(t, (n_labels,)).copy()


def predict(task: str, probs: Any, thresholds: Any = None) -> np.ndarray:
    """Hard predictions: thresholded P(class 1) for binary, argmax for (ordinal) multiclass, per-label
    ``probs > thresholds`` (N, C) for multilabel."""
    check_task(task)
    p = np.asarray(probs, dtype=np.float64)
    if task == "binary":
        return (p[:, 1] > _as_thresholds(task, thresholds, 1)[0]).astype(np.int64)
    if task == "multilabel":
        return (p > _as_thresholds(task, thresholds, p.shape[1])).astype(np.int64)
    if thresholds is not None:
        raise ValueError(f"thresholds only apply to binary and multilabel tasks, not {task}")
    return p.argmax(1)


def one_vs_rest(task: str, y_true: Any, probs: Any, mask: Any = None
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(class index, 0/1 truth, score)`` per class (single-label) or label (multilabel), with
    masked entries dropped: the common ground of per-class AUC, ROC curves and thresholds."""
    y, p, m = _validate(task, y_true, probs, mask)
    for c in range(p.shape[1]):
        if m is None:
            yield c, (y == c).astype(np.int64), p[:, c]
        else:
            keep = m[:, c] > 0
            yield c, y[keep, c], p[keep, c]


def _quiet(fn, *args, **kwargs):
    """Call a scikit-learn metric with its undefined-value warnings silenced (we report those ourselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*(single label|not in y_true|sum to one).*")
        return fn(*args, **kwargs)


def _nanmean(a: Any, axis: int | None = None) -> Any:
    """Mean ignoring NaN, NaN (without a warning) where nothing is left."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _name(c: int, class_names: Sequence[str] | None) -> str:
    return repr(class_names[c]) if class_names is not None and c < len(class_names) else f"#{c}"


# ---------------------------------------------------------------------------------------- metrics
def per_class_auc(task: str, y_true: Any, probs: Any, mask: Any = None) -> np.ndarray:
    """One-vs-rest AUC per class/label; NaN where ``y_true`` has a single value for that class."""
    return np.array([roc_auc_score(t, s) if 0 < t.sum() < len(t) else np.nan
                     for _, t, s in one_vs_rest(task, y_true, probs, mask)])


def classification_metrics(task: str, y_true: Any, probs: Any, thresholds: Any = None, mask: Any = None,
                           *, class_names: Sequence[str] | None = None, n_bins: int = 15) -> dict:
    """All headline, per-class and calibration metrics of one prediction set, as a JSON-ready dict.

    Keys: acc, balanced_acc, f1_macro, precision_macro, recall_macro, auc, kappa (Cohen's; mean over
    labels for multilabel), kappa_quadratic (ordinal), per_class (precision/recall/f1/support/auc
    lists), confusion_matrix (C x C, or one 2 x 2 per label), ece, nll (log loss; mean masked binary
    cross-entropy for multilabel), brier, n and notes (what was left out of a mean, and why).
    """
    y, p, m = _validate(task, y_true, probs, mask)
    pred = predict(task, p, thresholds)
    auc = per_class_auc(task, y, p, m)
    if task == "multilabel":
        out = _multilabel_metrics(y, p, pred, m)
    else:
        out = _single_label_metrics(task, y, p, pred)
    out["per_class"]["auc"] = auc.tolist()
    # binary: class 1's one-vs-rest AUC is exactly roc_auc_score(y, probs[:, 1]), MedMNIST's definition
    out["auc"] = float(auc[1]) if task == "binary" else float(_nanmean(auc))
    out["ece"] = expected_calibration_error(y, p, n_bins=n_bins, task=task, mask=m)
    out["notes"] = [f"AUC undefined for class {_name(c, class_names)} (only one value in y_true); "
                    "left out of the mean AUC" for c in np.flatnonzero(np.isnan(auc))]
    return out


def _single_label_metrics(task: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict:
    labels = list(range(p.shape[1]))
    prec, rec, f1, support = _quiet(precision_recall_fscore_support, y, pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y)),
        "acc": float(accuracy_score(y, pred)),
        "balanced_acc": float(_quiet(balanced_accuracy_score, y, pred)),
        "f1_macro": float(f1.mean()), "precision_macro": float(prec.mean()), "recall_macro": float(rec.mean()),
        "kappa": float(_quiet(cohen_kappa_score, y, pred, labels=labels)),
        "per_class": {"precision": prec.tolist(), "recall": rec.tolist(), "f1": f1.tolist(),
                      "support": support.astype(int).tolist()},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "nll": float(_quiet(log_loss, y, p / p.sum(1, keepdims=True), labels=labels)),
        "brier": float(_quiet(brier_score_loss, y, p, labels=labels)),
    }
    if task == "ordinal":
        out["kappa_quadratic"] = float(_quiet(cohen_kappa_score, y, pred, labels=labels, weights="quadratic"))
    return out


def _multilabel_metrics(y: np.ndarray, p: np.ndarray, pred: np.ndarray, m: np.ndarray) -> dict:
    """Per-label binary metrics on unmasked entries, averaged over labels (MedMNIST-style ACC)."""
    rows = [_binary_label_metrics(y[m[:, c] > 0, c], pred[m[:, c] > 0, c]) for c in range(p.shape[1])]
    col = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0] if k != "cm"}
    keep = m.ravel() > 0
    y_flat, p_flat = y.ravel()[keep], p.ravel()[keep]
    return {
        "n": int(len(y)),
        **{k: float(_nanmean(col[k])) for k in ("acc", "balanced_acc", "kappa")},
        **{f"{k}_macro": float(_nanmean(col[k])) for k in ("f1", "precision", "recall")},
        "per_class": {"precision": col["precision"].tolist(), "recall": col["recall"].tolist(),
                      "f1": col["f1"].tolist(), "support": col["support"].astype(int).tolist()},
        "confusion_matrix": [r["cm"] for r in rows],
        "nll": float(_quiet(log_loss, y_flat, p_flat, labels=[0, 1])) if keep.any() else float("nan"),
        "brier": float(brier_score_loss(y_flat, p_flat, labels=[0, 1])) if keep.any() else float("nan"),
    }


def _binary_label_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    """Scores of one multilabel column (NaN everywhere when every entry is masked)."""
    if len(y) == 0:
        nan = float("nan")
        return {"acc": nan, "balanced_acc": nan, "kappa": nan, "precision": nan, "recall": nan, "f1": nan,
                "support": 0, "cm": [[0, 0], [0, 0]]}
    prec, rec, f1, _ = _quiet(precision_recall_fscore_support, y, pred, labels=[1], zero_division=0)
    return {"acc": accuracy_score(y, pred), "balanced_acc": _quiet(balanced_accuracy_score, y, pred),
            "kappa": _quiet(cohen_kappa_score, y, pred, labels=[0, 1]), "precision": prec[0],
            "recall": rec[0], "f1": f1[0], "support": int(y.sum()),
            "cm": confusion_matrix(y, pred, labels=[0, 1]).tolist()}


# ------------------------------------------------------------------------------------ calibration
def _top_label(task: str, y: np.ndarray, p: np.ndarray, m: np.ndarray | None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(confidence, correct) pairs: one set for single-label, one per label for multilabel, where each
    label is a binary classifier whose confidence is max(p, 1 - p)."""
    if m is None:
        yield p.max(1), (p.argmax(1) == y).astype(np.float64)
        return
    for c in range(p.shape[1]):
        keep = m[:, c] > 0
        pc, yc = p[keep, c], y[keep, c]
        yield np.maximum(pc, 1 - pc), ((pc > 0.5) == (yc == 1)).astype(np.float64)


def _bin_stats(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Counts, summed confidence and summed correctness in equal-width bins (0, 1/n], ..., ((n-1)/n, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    return (count, np.bincount(idx, weights=conf, minlength=n_bins),
            np.bincount(idx, weights=correct, minlength=n_bins))


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    if len(conf) == 0:
        return float("nan")
    count, conf_sum, correct_sum = _bin_stats(conf, correct, n_bins)
    return float(np.abs(conf_sum - correct_sum).sum() / count.sum())


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15, task: str = "multiclass",
                               mask: Any = None) -> float:
    """Top-label ECE, sum over bins of |accuracy - confidence| weighted by bin size; for multilabel the
    mean over labels of each label's (binary, top-label) ECE."""
    y, p, m = _validate(task, y_true, probs, mask)
    return float(_nanmean([_ece(conf, ok, n_bins) for conf, ok in _top_label(task, y, p, m)]))


def reliability_curve(y_true: Any, probs: Any, n_bins: int = 15, task: str = "multiclass",
                      mask: Any = None) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count for a reliability diagram (multilabel entries pooled).

    Returns ``edges`` (n_bins + 1), ``confidence``, ``accuracy`` (NaN for empty bins) and ``count``.
    """
    y, p, m = _validate(task, y_true, probs, mask)
    pairs = list(_top_label(task, y, p, m))
    conf, ok = (np.concatenate([pair[i] for pair in pairs]) for i in (0, 1))
    count, conf_sum, ok_sum = _bin_stats(conf, ok, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": np.linspace(0, 1, n_bins + 1), "confidence": conf_sum / count,
                "accuracy": ok_sum / count, "count": count.astype(np.int64)}


def _nll_of_logits(z: np.ndarray, y: np.ndarray, task: str, m: np.ndarray | None) -> float:
    """Mean softmax cross-entropy, or masked mean binary cross-entropy for multilabel."""
    if task != "multilabel":
        return float(-log_softmax(z, axis=1)[np.arange(len(y)), y].mean())
    bce = -(y * log_expit(z) + (1 - y) * log_expit(-z))
    return float((bce * m).sum() / max(m.sum(), 1.0))


def fit_temperature(logits: Any, y_true: Any, task: str, mask: Any = None,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising validation NLL of ``logits / T`` (Guo et al. 2017).

    Searches log T within ``bounds`` so T stays positive and the search is symmetric in scale.
    """
    y, z, m = _validate(task, y_true, logits, mask)
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite to fit a temperature")
    res = minimize_scalar(lambda log_t: _nll_of_logits(z / np.exp(log_t), y, task, m),
                          bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def fit_class_bias(logits: Any, y_true: Any, task: str, balanced: bool = False) -> np.ndarray:
    """Per-class offsets b (mean 0) minimising the validation NLL of ``logits + b`` (single-label tasks).

    For scorers whose logits favour some classes for every image (e.g. a class-conditional denoiser that
    reconstructs one class better whatever the input), which a temperature cannot undo. ``balanced`` weights
    each class's images equally, so the offsets do not add the validation set's class prior.
    """
    if task == "multilabel":
        raise ValueError("fit_class_bias is for single-label tasks; multilabel thresholds come from choose_thresholds")
    y, z, _ = _validate(task, y_true, logits)
    onehot = np.eye(z.shape[1])[y]
    counts = np.bincount(y, minlength=z.shape[1]).astype(np.float64)
    w = 1.0 / (counts[y] * (counts > 0).sum()) if balanced else np.full(len(y), 1.0 / len(y))

    def nll_and_grad(b: np.ndarray) -> tuple[float, np.ndarray]:
        s = z + b
        nll = -(w * log_softmax(s, axis=1)[np.arange(len(y)), y]).sum()
        return float(nll), (w[:, None] * (softmax(s, axis=1) - onehot)).sum(0)

    b = minimize(nll_and_grad, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return b - b.mean()


def apply_temperature(logits: Any, temperature: float, task: str) -> np.ndarray:
    """Probabilities of ``logits / T``: softmax for single-label, sigmoid for multilabel."""
    check_task(task)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive; got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return expit(z) if task == "multilabel" else softmax(z, axis=1)


def probs_to_logits(probs: Any, task: str) -> np.ndarray:
    """Logits reproducing ``probs`` (log p for softmax, up to a per-row constant; logit p for sigmoid),
    e.g. to undo a temperature: ``apply_temperature(probs_to_logits(p, task), 1 / T, task)``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return logit(p) if check_task(task) == "multilabel" else np.log(p)


def choose_thresholds(y_true: Any, probs: Any, mask: Any = None) -> np.ndarray:
    """Per-label threshold maximising F1 on validation (multilabel); 0.5 where a label has no positive.

    Each threshold lies halfway between the chosen score and the next lower score so that the
    ``probs > threshold`` rule used by :func:`predict` reproduces the optimum.
    """
    return np.array([_best_f1_threshold(t, s) for _, t, s in one_vs_rest("multilabel", y_true, probs, mask)])


def _best_f1_threshold(y: np.ndarray, score: np.ndarray) -> float:
    if y.sum() == 0:
        return 0.5
    precision, recall, cut = precision_recall_curve(y, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = cut[int(np.argmax(f1))]
    lower = score[score < best]
    return float((best + lower.max()) / 2 if lower.size else np.nextafter(best, -np.inf))


# -------------------------------------------------------------------------------------- bootstrap
def resample_weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` items as (B, n) count matrices, in chunks to bound memory.

    Row b says how often each item is drawn in resample b; the same seed gives the same resamples,
    which is what makes paired comparisons paired.
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs at least one item and one resample; got n={n}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CELLS_PER_CHUNK // n)
    for start in range(0, n_boot, per_chunk):
        b = min(per_chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _weighted_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) under each row of sample weights ``w`` (B, n)."""
    order = np.argsort(score, kind="stable")
    s, pos, w = score[order], positive[order].astype(bool), w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / den, np.nan)


def _resampled_auc(task: str, w: np.ndarray, y: np.ndarray, p: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    if task == "binary":
        return _weighted_auc(w, y == 1, p[:, 1])
    per_class = [_weighted_auc(w if m is None else w[:, m[:, c] > 0], t, s)
                 for c, t, s in one_vs_rest(task, y, p, m)]
    return _nanmean(np.stack(per_class, axis=1), axis=1)


def _resampled_confusion(w: np.ndarray, y: np.ndarray, pred: np.ndarray, n_classes: int,
                         m: np.ndarray | None) -> np.ndarray:
    """Weighted confusion matrices: (B, C, C) single-label, (B, C, 2, 2) one per label for multilabel."""
    if m is None:
        k = n_classes
        onehot = np.zeros((len(y), k * k))
        onehot[np.arange(len(y)), y * k + pred] = 1.0
        return (w @ onehot).reshape(len(w), k, k)
    n, c = y.shape
    onehot = np.zeros((n, c, 4))
    onehot[np.arange(n)[:, None], np.arange(c)[None, :], y * 2 + pred] = 1.0
    onehot *= m[:, :, None]
    return (w @ onehot.reshape(n, c * 4)).reshape(len(w), c, 2, 2)


def _kappa_from_confusion(cm: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Cohen's kappa 1 - sum(W*O)/sum(W*E) per stacked confusion matrix (NaN where undefined)."""
    total = cm.sum((-1, -2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cm.sum(-1, keepdims=True) * cm.sum(-2, keepdims=True) / total
        den = (weights * expected).sum((-1, -2))
        return np.where(den > 0, 1 - (weights * cm).sum((-1, -2)) / den, np.nan)


def _scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """sklearn-equivalent scores of stacked confusion matrices (rows true, columns predicted)."""
    k = cm.shape[-1]
    diag, rows, cols = np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(-1), cm.sum(-2)
    grid, empty = np.arange(k), cm.sum((-1, -2))[..., None] == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall_present = np.where(rows > 0, diag / rows, np.nan)
        zero_division = np.where(empty, np.nan, 0.0)
        return {
            "acc": diag.sum(-1) / cm.sum((-1, -2)),
            "balanced_acc": _nanmean(recall_present, axis=-1),
            "precision": np.where(cols > 0, diag / cols, zero_division),
            "recall": np.where(rows > 0, recall_present, zero_division),
            "f1": np.where(rows + cols > 0, 2 * diag / (rows + cols), zero_division),
            "kappa": _kappa_from_confusion(cm, 1.0 - np.eye(k)),
            "kappa_quadratic": _kappa_from_confusion(cm, (grid[:, None] - grid[None, :]) ** 2.0),
        }


def _resampled_metrics(task: str, w: np.ndarray, y: np.ndarray, p: np.ndarray, pred: np.ndarray,
                       m: np.ndarray | None, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each named metric under each resample (row of ``w``), computed without a Python loop over rows."""
    out = {}
    if "auc" in names:
        out["auc"] = _resampled_auc(task, w, y, p, m)
    if set(names) - {"auc"}:
        s = _scores_from_confusion(_resampled_confusion(w, y, pred, p.shape[1], m))
        if task == "multilabel":  # per-label 2x2 scores; F1 & co. of the positive class; mean over labels
            s = {k: _nanmean(v[..., 1] if v.ndim == 3 else v, axis=1) for k, v in s.items()}
        else:
            s.update({k: v.mean(-1) for k, v in s.items() if v.ndim == 2})
        out.update({n: s[n.removesuffix("_macro")] for n in names if n != "auc"})
    return out


def _check_bootstrap_metrics(task: str, names: Sequence[str]) -> None:
    bad = [n for n in names if n not in BOOTSTRAP_METRICS or n == "kappa_quadratic" and task != "ordinal"]
    if bad:
        raise ValueError(f"cannot bootstrap {bad} for {task}; choose from {', '.join(BOOTSTRAP_METRICS)} "
                         "(kappa_quadratic for ordinal tasks only)")


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float, int]:
    """Percentile interval of the finite samples and how many undefined ones were dropped."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    ok = samples[np.isfinite(samples)]
    if ok.size == 0:
        return float("nan"), float("nan"), int(samples.size)
    alpha = (1 - level) / 2
    low, high = np.quantile(ok, [alpha, 1 - alpha])
    return float(low), float(high), int(samples.size - ok.size)


def bootstrap_samples(task: str, y_true: Any, probs: Any, metrics: Sequence[str], n_boot: int = 1000,
                      seed: int = 0, thresholds: Any = None, mask: Any = None) -> dict[str, np.ndarray]:
    """(n_boot,) values of each metric over percentile-bootstrap resamples of the images (NaN where a
    resample leaves the metric undefined)."""
    metrics = tuple(metrics)
    _check_bootstrap_metrics(task, metrics)
    y, p, m = _validate(task, y_true, probs, mask)
    pred = predict(task, p, thresholds)
    chunks = [_resampled_metrics(task, w, y, p, pred, m, metrics) for w in resample_weights(len(y), n_boot, seed)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in metrics}


def bootstrap_ci(task: str, y_true: Any, probs: Any,
                 metrics: Sequence[str] = ("acc", "balanced_acc", "f1_macro", "auc", "kappa"),
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0, thresholds: Any = None,
                 mask: Any = None) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CIs over test images: ``{metric: {value, low, high, n_dropped}}``.

    ``value`` is the full-sample estimate from :func:`classification_metrics`; ``n_dropped`` counts
    resamples where the metric was undefined (e.g. a single class drawn), which are left out.
    """
    samples = bootstrap_samples(task, y_true, probs, metrics, n_boot, seed, thresholds, mask)
    point = classification_metrics(task, y_true, probs, thresholds, mask)
    out = {}
    for name, s in samples.items():
        low, high, dropped = percentile_interval(s, level)
        out[name] = {"value": float(point[name]), "low": low, "high": high, "n_dropped": dropped}
    return out
