"""Evaluation: metrics matching the MedMNIST evaluator, calibration, bootstrap CIs and run comparison."""
from diffmed.evaluation.compare import (
    RunPredictions, compare_runs, format_comparison, load_predictions, mcnemar_test, paired_bootstrap,
)
from diffmed.evaluation.metrics import (
    BOOTSTRAP_METRICS, TASKS, apply_temperature, bootstrap_ci, bootstrap_samples, choose_thresholds,
    classification_metrics, expected_calibration_error, fit_temperature, one_vs_rest, per_class_auc,
    percentile_interval, predict, probs_to_logits, reliability_curve, resample_weights,
)

__all__ = [
    "BOOTSTRAP_METRICS", "TASKS", "RunPredictions", "apply_temperature", "bootstrap_ci", "bootstrap_samples",
    "choose_thresholds", "classification_metrics", "compare_runs", "expected_calibration_error",
    "fit_temperature", "format_comparison", "load_predictions", "mcnemar_test", "one_vs_rest",
    "paired_bootstrap", "per_class_auc", "percentile_interval", "predict", "probs_to_logits",
    "reliability_curve", "resample_weights",
]
