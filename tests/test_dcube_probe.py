"""benchmarks/dcube_probe.py: linear probes on frozen hyper-features, next to the recorded runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark
from diffmed.evaluation.compare import load_predictions

probe = load_benchmark("dcube_probe")
RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist" / "runs"


def synthetic_features(y_test: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Block 'signal' carries the label, block 'noise' and the pixels do not; 'signal' is the selected layer."""
    rng = np.random.default_rng(seed)
    y = {"train": rng.integers(0, 2, 400), "val": rng.integers(0, 2, 200), "test": y_test}
    arrays = {}
    for split, labels in y.items():
        arrays[f"{split}/signal"] = labels[:, None] * 1.5 + rng.normal(size=(len(labels), 4))
        arrays[f"{split}/noise"] = rng.normal(size=(len(labels), 8))
        arrays[f"{split}/pixels"] = rng.normal(size=(len(labels), 16))
        arrays[f"{split}/y"] = labels
    arrays["selected_layers"] = np.array(["signal"])
    return arrays


@pytest.fixture()
def argv(tmp_path):
    for run in ("baseline-s0", "dcube-s0"):
        shutil.copytree(RECORDS / run, tmp_path / "out" / "pneumoniamnist" / "runs" / run)
    return ["--dataset", "pneumoniamnist", "--seeds", "0", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work")]


def test_probes_use_the_selected_blocks_and_compare_with_the_recorded_baseline(argv, tmp_path, monkeypatch):
    y_test = load_predictions(RECORDS / "baseline-s0").y_true
    arrays = synthetic_features(y_test)
    assert probe.design(arrays, "train", "selected").shape == (400, 4)
    assert probe.design(arrays, "train", "all").shape == (400, 12)
    monkeypatch.setattr(probe, "extract", lambda args, seed: arrays)
    probe.main(argv)
    results = json.loads((tmp_path / "out" / "pneumoniamnist" / "dcube_probe.json").read_text())["seeds"]["0"]
    recorded = json.loads((RECORDS / "dcube-s0" / "metrics.json").read_text())["test"]["f1_macro"]
    assert results["dcube (recorded)"]["test"]["f1_macro"] == recorded
    assert results["baseline (recorded)"]["f1_vs_baseline"]["diff"] == 0
    informative, blind = results["probe: selected"], results["probe: pixels"]
    assert informative["C"] in probe.C_GRID and informative["dims"] == 4
    assert informative["test"]["f1_macro"] > 0.85 and blind["test"]["auc"] < 0.65
    assert informative["f1_vs_baseline"]["diff"] == pytest.approx(
        informative["test"]["f1_macro"] - results["baseline (recorded)"]["test"]["f1_macro"])
    short, long = (results[f"fc head: run's optimiser, {n} epochs"] for n in (8, 32))  # the record's 8, x4
    assert short["test"]["f1_macro"] > 0.8 and long["test"]["f1_macro"] > 0.8
    assert "| probe: selected, balanced |" in (tmp_path / "out" / "pneumoniamnist" / "dcube_probe.md").read_text()


def test_a_split_that_is_not_the_recorded_one_is_refused(argv, monkeypatch):
    y_test = load_predictions(RECORDS / "baseline-s0").y_true
    monkeypatch.setattr(probe, "extract", lambda args, seed: synthetic_features(1 - y_test))
    with pytest.raises(SystemExit, match="test targets differ"):
        probe.main(argv)
