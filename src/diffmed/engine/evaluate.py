"""Validation calibration (temperature, thresholds) and the test results files of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diffmed.config import RunConfig
from diffmed.data.types import LabelledSet, TaskSpec
from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json
from diffmed.engine.inference import Outputs, collect_outputs
from diffmed.methods.losses import metric_mask
from diffmed.evaluation.metrics import (apply_temperature, bootstrap_ci, choose_thresholds, classification_metrics,
                                        expected_calibration_error, fit_temperature)

HEADLINE = ("acc", "balanced_acc", "f1_macro", "auc", "kappa")
"""Metrics reported with bootstrap CIs by every run and benchmark."""


def headline_metrics(task: str) -> tuple[str, ...]:
    """HEADLINE, plus the quadratic-weighted kappa that ordinal grading (e.g. retinopathy) is judged by."""
    return HEADLINE + ("kappa_quadratic",) if task == "ordinal" else HEADLINE


def _class_logits(logits: np.ndarray, spec: TaskSpec) -> np.ndarray:
    return logits[:, : spec.num_classes]


def _mask(out: Outputs, spec: TaskSpec) -> np.ndarray | None:
    return metric_mask(out.targets, out.masks) if spec.multilabel else None


def calibrated_probs(logits: np.ndarray, spec: TaskSpec, temperature: float) -> np.ndarray:
    return apply_temperature(_class_logits(logits, spec), temperature, spec.task)


def evaluate_split(method, loader, spec: TaskSpec) -> dict:
    """Fit the temperature (and multi-label thresholds) on validation outputs; return them with val metrics."""
    return calibrate_on(collect_outputs(method, loader), spec)


def calibrate_on(out: Outputs, spec: TaskSpec) -> dict:
    """``evaluate_split`` for outputs already collected."""
    temperature = float(fit_temperature(_class_logits(out.logits, spec), out.targets, spec.task, mask=_mask(out, spec)))
    probs = calibrated_probs(out.logits, spec, temperature)
    thresholds = choose_thresholds(out.targets, probs, mask=_mask(out, spec)).tolist() if spec.multilabel else None
    metrics = classification_metrics(spec.task, out.targets, probs, thresholds=thresholds, mask=_mask(out, spec))
    return {"temperature": temperature, "thresholds": thresholds, "metrics": metrics}


def predictions_frame(ids: list[str], probs: np.ndarray, spec: TaskSpec, targets: np.ndarray | None = None,
                      thresholds: list[float] | None = None) -> pd.DataFrame:
    """One row per image: id, target, pred, confidence and one probability column per class or label."""
    names = spec.class_names
    df = pd.DataFrame({"id": ids})
    if spec.multilabel:
        th = np.asarray(thresholds if thresholds is not None else [0.5] * len(names))
        if targets is not None:
            for j, n in enumerate(names):
                df[f"target_{n}"] = targets[:, j]
        for j, n in enumerate(names):
            df[f"pred_{n}"] = (probs[:, j] >= th[j]).astype(int)
    else:
        if targets is not None:
            df["target"] = targets.astype(int)
        df["pred"] = probs.argmax(1)
        df["pred_name"] = [names[i] for i in df["pred"]]
        df["confidence"] = probs.max(1)
    for j, n in enumerate(names):
        df[f"prob_{n}"] = probs[:, j]
    return df


def write_test_results(out_dir: Path, cfg: RunConfig, spec: TaskSpec, test: LabelledSet, out: Outputs, val: dict,
                       cost: dict) -> dict:
    """metrics.json (test metrics with bootstrap CIs, val metrics, calibration, cost), predictions.csv, report."""
    raw = calibrated_probs(out.logits, spec, 1.0)
    probs = calibrated_probs(out.logits, spec, val["temperature"])
    mask = _mask(out, spec)
    metrics = classification_metrics(spec.task, out.targets, probs, thresholds=val["thresholds"], mask=mask)
    metrics["ece_uncalibrated"] = expected_calibration_error(out.targets, raw, task=spec.task, mask=mask)
    ci = bootstrap_ci(spec.task, out.targets, probs, metrics=headline_metrics(spec.task), n_boot=cfg.eval.bootstrap,
                      level=cfg.eval.ci_level, seed=cfg.train.seed, thresholds=val["thresholds"], mask=mask)
    result = {"method": cfg.method.name, "dataset": cfg.data.source, "seed": cfg.train.seed, "task": spec.task,
              "class_names": spec.class_names, "n_test": int(len(out.targets)), "test": metrics, "test_ci": ci,
              "val": val.get("metrics", {}), "temperature": val["temperature"], "thresholds": val["thresholds"],
              "cost": cost}
    atomic_write_json(Path(out_dir) / "metrics.json", result)
    ids = [test.ids[i] for i in out.index]
    df = predictions_frame(ids, probs, spec, out.targets, val["thresholds"])
    atomic_write_bytes(Path(out_dir) / "predictions.csv", df.to_csv(index=False).encode())
    from diffmed.report import write_report

    write_report(Path(out_dir))
    return result
