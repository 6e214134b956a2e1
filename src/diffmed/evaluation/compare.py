"""Paired comparison of two models on the same test images: McNemar's test and a paired bootstrap."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

from diffmed.errors import RunError
from diffmed.evaluation.metrics import (
    bootstrap_samples, check_task, classification_metrics, percentile_interval, predict,
)

EXACT_BELOW = 25
"""McNemar uses the exact binomial test when fewer than this many pairs disagree."""


def mcnemar_test(y_true: Any, pred_a: Any, pred_b: Any, mask: Any = None) -> dict[str, float]:
    """McNemar's test on paired correctness (exact when b + c < 25, else chi-square with continuity
    correction). Multilabel (N, C) inputs are compared per entry, skipping entries where mask is 0.

    ``b`` counts entries A got right and B wrong, ``c`` the reverse.
    """
    y, a, b_pred = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if not y.shape == a.shape == b_pred.shape:
        raise ValueError(f"y_true {y.shape}, pred_a {a.shape} and pred_b {b_pred.shape} must have one shape")
    keep = np.ones(y.shape, bool) if mask is None else np.asarray(mask) > 0
    ok_a, ok_b = (a == y)[keep], (b_pred == y)[keep]
    b, c = int(np.sum(ok_a & ~ok_b)), int(np.sum(~ok_a & ok_b))
    table = [[int(np.sum(ok_a & ok_b)), b], [c, int(np.sum(~ok_a & ~ok_b))]]
    res = mcnemar(table, exact=b + c < EXACT_BELOW, correction=True)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "b": b, "c": c}


def _paired_bootstrap_many(task: str, y_true: Any, probs_a: Any, probs_b: Any, metrics: Sequence[str],
                           n_boot: int, seed: int, level: float, thresholds_a: Any, thresholds_b: Any,
                           mask: Any) -> dict[str, dict[str, float]]:
    """Paired bootstrap of several metrics at once: one seed gives both models the same resamples."""
    if np.shape(probs_a) != np.shape(probs_b):
        raise ValueError(f"probs_a {np.shape(probs_a)} and probs_b {np.shape(probs_b)} must have the same shape")
    out = {}
    for probs, thresholds, key in ((probs_a, thresholds_a, "a"), (probs_b, thresholds_b, "b")):
        point = classification_metrics(task, y_true, probs, thresholds, mask)
        samples = bootstrap_samples(task, y_true, probs, metrics, n_boot, seed, thresholds, mask)
        out[key] = {k: (float(point[k]), samples[k]) for k in metrics}
    return {k: {"a": out["a"][k][0], "b": out["b"][k][0],
                **diff_summary(out["a"][k][0] - out["b"][k][0], out["a"][k][1] - out["b"][k][1], level)}
            for k in metrics}


def diff_summary(diff: float, samples: np.ndarray, level: float) -> dict[str, float]:
    """Point difference, percentile CI and two-sided bootstrap p-value of a difference."""
    low, high, dropped = percentile_interval(samples, level)
    ok = samples[np.isfinite(samples)]
    n = len(samples)
    p = 2 * min(np.mean(ok <= 0), np.mean(ok >= 0)) if ok.size else float("nan")
    return {"diff": float(diff), "low": low, "high": high, "p_value": float(np.clip(p, 1 / n, 1)),
            "n_dropped": dropped}


def paired_bootstrap(task: str, y_true: Any, probs_a: Any, probs_b: Any, metric: str = "auc",
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95, thresholds_a: Any = None,
                     thresholds_b: Any = None, mask: Any = None) -> dict[str, float]:
    """Difference ``metric(A) - metric(B)`` with a paired percentile CI and two-sided p-value
    ``2 * min(P(diff <= 0), P(diff >= 0))`` clipped to [1/n_boot, 1]; both models see the same resamples.
    """
    res = _paired_bootstrap_many(task, y_true, probs_a, probs_b, (metric,), n_boot, seed, level,
                                 thresholds_a, thresholds_b, mask)[metric]
    return {k: res[k] for k in ("diff", "low", "high", "p_value", "n_dropped")}


# ------------------------------------------------------------------------------------------- runs
@dataclass
class RunPredictions:
    """A run's test predictions as arrays (read from ``predictions.csv`` and ``model/model.json``)."""

    run_dir: Path
    task: str
    class_names: list[str]
    ids: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    mask: np.ndarray | None
    thresholds: list[float] | None


def read_run_json(path: Path) -> dict:
    """A run's JSON file, or RunError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise RunError(f"{path} is missing; is {path.parent} a finished diffmed run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON: {e}") from e


def _columns(df: pd.DataFrame, prefix: str, class_names: Sequence[str], path: Path) -> np.ndarray:
    cols = [f"{prefix}{name}" for name in class_names]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise RunError(f"{path} lacks columns {missing} for the classes in model/model.json")
    return df[cols].to_numpy(dtype=np.float64)


def _class_index(values: pd.Series, class_names: Sequence[str], path: Path) -> np.ndarray:
    """Class indices from a column of class names, or of indices when the column is numeric."""
    lookup = {str(n): i for i, n in enumerate(class_names)}
    if values.map(lambda v: str(v) in lookup).all() and not pd.api.types.is_numeric_dtype(values):
        return values.map(lambda v: lookup[str(v)]).to_numpy(np.int64)
    idx = pd.to_numeric(values, errors="coerce")
    if idx.isna().any() or not idx.between(0, len(class_names) - 1).all():
        raise RunError(f"{path}: column {values.name!r} must hold class indices 0..{len(class_names) - 1} "
                       "or class names")
    return idx.to_numpy(np.int64)


def load_predictions(run_dir: str | Path) -> RunPredictions:
    """Read a run's test predictions; multilabel targets that are blank or not 0/1 are masked out."""
    run_dir = Path(run_dir)
    model = read_run_json(run_dir / "model" / "model.json")
    task, names = check_task(model.get("task", "")), list(model.get("class_names", []))
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise RunError(f"{path} is missing; evaluate the run first")
    df = pd.read_csv(path, dtype={"id": str})
    probs = _columns(df, "prob_", names, path)
    metrics_path = run_dir / "metrics.json"
    thresholds = read_run_json(metrics_path).get("thresholds") if metrics_path.is_file() else None
    if task == "multilabel":
        target = _columns(df, "target_", names, path)
        mask = np.isin(target, (0, 1))
        y = np.where(mask, target, 0).astype(np.int64)
        pred = predict(task, probs, thresholds)
        mask = mask.astype(np.float64)
    else:
        y, mask = _class_index(df["target"], names, path), None
        pred = _class_index(df["pred"], names, path) if "pred" in df else predict(task, probs, thresholds)
    return RunPredictions(run_dir, task, names, df["id"].tolist() if "id" in df else [], y, probs, pred,
                          mask, thresholds)


def _check_same_test_set(a: RunPredictions, b: RunPredictions) -> None:
    """RunError unless both runs scored the same test images, in the same order, for the same classes."""
    where = f"runs {a.run_dir} and {b.run_dir}"
    if (a.task, a.class_names) != (b.task, b.class_names):
        raise RunError(f"{where} differ in task or classes ({a.task} {a.class_names} vs {b.task} {b.class_names})")
    if len(a.ids) != len(b.ids):
        raise RunError(f"{where} predicted different test sets ({len(a.ids)} vs {len(b.ids)} images)")
    differ = [i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y]
    if differ:
        raise RunError(f"{where} list different test ids or orders ({len(differ)} rows differ, first at row "
                       f"{differ[0] + 1}); compare runs evaluated on the same split")
    same_truth = np.array_equal(a.y_true, b.y_true) and np.array_equal(
        *(np.ones_like(r.y_true) if r.mask is None else r.mask for r in (a, b)))
    if not same_truth:
        raise RunError(f"{where} have the same ids but different targets; were they built from different labels?")


def compare_runs(dir_a: str | Path, dir_b: str | Path,
                 metrics: Sequence[str] = ("auc", "f1_macro", "acc", "balanced_acc"),
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Compare two runs on their shared test set: McNemar on hard predictions plus a paired bootstrap
    of each metric. Returns a JSON-ready dict whose ``markdown`` entry is :func:`format_comparison`."""
    a, b = load_predictions(dir_a), load_predictions(dir_b)
    _check_same_test_set(a, b)
    result = {
        "run_a": str(a.run_dir), "run_b": str(b.run_dir), "task": a.task, "n": len(a.y_true),
        "n_boot": n_boot, "level": level, "seed": seed,
        "mcnemar": mcnemar_test(a.y_true, a.pred, b.pred, a.mask),
        "metrics": _paired_bootstrap_many(a.task, a.y_true, a.probs, b.probs, metrics, n_boot, seed, level,
                                          a.thresholds, b.thresholds, a.mask),
    }
    result["markdown"] = format_comparison(result)
    return result


def _f(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def format_comparison(result: dict) -> str:
    """Markdown table of a :func:`compare_runs` result (A minus B, with CI and p-values)."""
    pct = round(100 * result.get("level", 0.95))
    lines = [f"A: `{result['run_a']}`  ", f"B: `{result['run_b']}`  ",
             f"Task: {result['task']}, {result['n']} test images, {result['n_boot']} paired bootstrap resamples", "",
             f"| metric | A | B | A - B | {pct}% CI | p |", "|---|---|---|---|---|---|"]
    for name, r in result["metrics"].items():
        lines.append(f"| {name} | {_f(r['a'])} | {_f(r['b'])} | {_f(r['diff'])} | "
                     f"[{_f(r['low'])}, {_f(r['high'])}] | {_f(r['p_value'])} |")
    mc = result["mcnemar"]
    lines += ["", f"McNemar: A right & B wrong = {mc['b']}, A wrong & B right = {mc['c']}, "
                  f"statistic = {_f(mc['statistic'], 3)}, p = {_f(mc['p_value'])}"]
    return "\n".join(lines)
