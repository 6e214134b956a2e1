"""Statistics across seeds: CIs of the seed-mean metric and paired tests of two methods over all seeds.

Every run is bootstrapped with the same resample indices (same seed, same test set), so averaging the
per-resample values over seeds gives the bootstrap distribution of the seed-mean metric: its interval
covers test-set sampling, and the spread over seeds is reported beside it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from diffmed.evaluation.compare import RunPredictions, diff_summary, mcnemar_test
from diffmed.evaluation.metrics import bootstrap_samples, classification_metrics, percentile_interval


def _samples(runs: Sequence[RunPredictions], metrics: Sequence[str], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    per_run = [bootstrap_samples(r.task, r.y_true, r.probs, metrics, n_boot, seed, r.thresholds, r.mask) for r in runs]
    return {m: np.mean([s[m] for s in per_run], axis=0) for m in metrics}


def _points(runs: Sequence[RunPredictions], metrics: Sequence[str]) -> dict[str, np.ndarray]:
    vals = [classification_metrics(r.task, r.y_true, r.probs, r.thresholds, r.mask) for r in runs]
    return {m: np.array([v[m] for v in vals], dtype=float) for m in metrics}


def seed_pooled_ci(runs: Sequence[RunPredictions], metrics: Sequence[str], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, dict]:
    """Per metric: mean and std over seeds, and the bootstrap CI of the seed mean."""
    points, samples = _points(runs, metrics), _samples(runs, metrics, n_boot, seed)
    out = {}
    for m in metrics:
        low, high, _ = percentile_interval(samples[m], level)
        v = points[m]
        out[m] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0,
                  "low": low, "high": high, "per_seed": v.tolist()}
    return out


def paired_seed_pooled(runs_a: Sequence[RunPredictions], runs_b: Sequence[RunPredictions], metrics: Sequence[str],
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Seed-mean difference A - B per metric with a paired bootstrap CI and p-value, and McNemar per seed."""
    pa, pb = _points(runs_a, metrics), _points(runs_b, metrics)
    sa, sb = _samples(runs_a, metrics, n_boot, seed), _samples(runs_b, metrics, n_boot, seed)
    out = {m: diff_summary(float(np.nanmean(pa[m]) - np.nanmean(pb[m])), sa[m] - sb[m], level) for m in metrics}
    out["mcnemar_p"] = [mcnemar_test(a.y_true, a.pred, b.pred, a.mask)["p_value"] for a, b in zip(runs_a, runs_b)]
    return out
