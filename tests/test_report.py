"""write_report on fake run directories built from small random predictions."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from diffmed.errors import RunError
from diffmed.evaluation import apply_temperature, bootstrap_ci, classification_metrics
from diffmed.report import write_report

NAMES = ["benign | cyst", "malignant", "normal"]
SECTIONS = ["summary", "headline-metrics", "per-class", "calibration", "roc", "confusion", "training", "cost",
            "configuration"]
PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, task="multiclass", names=NAMES, n=90, logs=True, temperature=1.7):
    """A run directory as the engine writes it, from random logits with some signal."""
    rng = np.random.default_rng(0)
    c = len(names)
    logits = rng.normal(size=(n, c)) * 2
    if task == "multilabel":
        y = (rng.random((n, c)) < 0.4).astype(float)
        logits += 2 * (2 * y - 1)
        mask = (rng.random((n, c)) < 0.9).astype(float)
    else:
        y, mask = rng.integers(0, c, n), None
        logits[np.arange(n), y] += 2
    probs = apply_temperature(logits, temperature, task)
    test = classification_metrics(task, y, probs, mask=mask)
    metrics = {"test": test, "test_ci": bootstrap_ci(task, y, probs, n_boot=100, mask=mask),
               "val": {k: test[k] for k in ("acc", "auc")}, "temperature": temperature, "thresholds": None,
               "n_test": n, "seed": 3, "method": "ddpm-aug", "dataset": "breastmnist",
               "cost": {"train_seconds": 12.5, "images_per_second": 310.2, "peak_memory_mb": 812.0,
                        "infer_seconds_per_image": 0.0021, "forward_passes_per_image": 1}}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "model").mkdir()
    model = {"method": "ddpm-aug", "task": task, "class_names": names}
    (run_dir / "model" / "model.json").write_text(json.dumps(model))
    (run_dir / "config.yaml").write_text("data:\n  dataset: breastmnist\ntrain:\n  epochs: 3\n")
    df = pd.DataFrame({"id": [f"patient_{i:05d}.png" for i in range(n)]})
    if task == "multilabel":
        for i, name in enumerate(names):
            df[f"target_{name}"] = np.where(mask[:, i] > 0, y[:, i], np.nan)
    else:
        df["target"], df["pred"], df["confidence"] = y, probs.argmax(1), probs.max(1)
    for i, name in enumerate(names):
        df[f"prob_{name}"] = probs[:, i]
    df.to_csv(run_dir / "predictions.csv", index=False)
    if logs:
        (run_dir / "logs").mkdir()
        rows = [{"epoch": e, "step": 10 * e + 9, "train/loss": 1.0 / (e + 1)} for e in range(3)]
        rows += [{"epoch": e, "step": 10 * e + 9, "val/loss": 1.2 / (e + 1), "val/auc": 0.6 + 0.1 * e,
                  "val/acc": 0.5 + 0.1 * e} for e in range(3)]
        pd.DataFrame(rows).to_csv(run_dir / "logs" / "metrics.csv", index=False)
    return run_dir


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, section_id
    return match.group(1)


def test_report_has_every_section_class_and_plot(tmp_path):
    run = _fake_run(tmp_path / "run")
    md, page = write_report(run)
    assert md == run / "report.md" and page == run / "report.html"
    html_text, md_text = page.read_text(), md.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html_text
        assert re.search(rf'<section id="{sid}">\s*<h2>', html_text), sid
    per_class = _section(html_text, "per-class")
    for name in NAMES:
        assert f"<td>{name}</td>" in per_class
        assert f"| {name.replace('|', chr(92) + '|')} |" in md_text
    pngs = sorted((run / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"roc", "confusion", "reliability", "per_class_recall", "training_curves"}
    assert all(p.read_bytes().startswith(PNG) for p in pngs)
    assert html_text.count('src="data:image/png;base64,') == len(pngs)
    assert "](plots/roc.png)" in md_text
    assert "patient_" not in html_text and "patient_" not in md_text
    assert "epochs: 3" in _section(html_text, "configuration")
    assert "1.700" in _section(html_text, "calibration")


def test_report_without_logs_or_cost_and_for_multilabel(tmp_path):
    run = _fake_run(tmp_path / "ml", task="multilabel", names=["effusion", "edema", "nodule", "mass"], logs=False)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["cost"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    _, page = write_report(run)
    html_text = page.read_text()
    assert 'id="training"' not in html_text and 'id="cost"' not in html_text
    for name in ["effusion", "edema", "nodule", "mass"]:
        assert f"<td>{name}</td>" in _section(html_text, "per-class")
    assert not (run / "plots" / "training_curves.png").exists()


def test_report_needs_metrics(tmp_path):
    run = _fake_run(tmp_path / "run", logs=False)
    (run / "metrics.json").unlink()
    with pytest.raises(RunError, match="metrics.json"):
        write_report(run)
