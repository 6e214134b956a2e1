"""The command line end to end on real data slices: data check, train, evaluate, predict, report, compare."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_overrides
from diffmed.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("-s", o)]


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, tiny_pneumonia):
    """Two tiny baseline runs (different seeds) on the same real test slice."""
    root = tmp_path_factory.mktemp("cli")
    runs = []
    for seed in (0, 1):
        out = root / f"run{seed}"
        res = invoke("train", "--out", out, "--seed", seed, *sets(tiny_overrides(tiny_pneumonia)))
        assert res.exit_code == 0, res.output
        runs.append(out)
    return runs


def test_train_writes_a_complete_run_folder(trained_pair):
    run = trained_pair[0]
    for name in ("config.yaml", "splits.json", "metrics.json", "predictions.csv", "report.md", "report.html",
                 "model/model.safetensors", "model/model.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "logs/metrics.csv", "plots/gradcam.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_test"] == 48 and 0 <= m["test"]["auc"] <= 1
    ci = m["test_ci"]["auc"]
    assert ci["low"] <= ci["value"] <= ci["high"]
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns[:3]) == ["id", "target", "pred"] and len(preds) == 48
    np.testing.assert_allclose(preds[["prob_normal", "prob_pneumonia"]].sum(1), 1.0, atol=1e-6)


def test_evaluate_reproduces_the_training_run_metrics(trained_pair):
    run = trained_pair[0]
    before = json.loads((run / "metrics.json").read_text())["test"]["auc"]
    res = invoke("evaluate", run)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "metrics.json").read_text())["test"]["auc"] == pytest.approx(before, abs=1e-9)


def test_evaluate_on_other_data_writes_a_separate_evaluation(trained_pair, tmp_path, shared_data):
    from conftest import slice_npz

    other = slice_npz(shared_data / "pneumoniamnist_imbalanced.npz", tmp_path / "pneumoniamnist_imbalanced.npz",
                      {"train": 40, "val": 20, "test": 30})
    res = invoke("evaluate", trained_pair[1], "-s", f"data.source={other}")
    assert res.exit_code == 0, res.output
    (folder,) = (trained_pair[1] / "evaluations").iterdir()
    assert json.loads((folder / "metrics.json").read_text())["n_test"] == 30
    assert (folder / "report.html").is_file()
    assert json.loads((trained_pair[1] / "metrics.json").read_text())["n_test"] == 48  # the run's own is kept


def test_predict_on_new_image_files(tmp_path, trained_pair, shared_data):
    with np.load(shared_data / "pneumoniamnist.npz") as f:
        images = f["test_images"][:3]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"x{i}.png")
        Image.fromarray(img).resize((64, 64)).save(paths[-1])  # another size: resized by the contract
    out = tmp_path / "pred.csv"
    res = invoke("predict", trained_pair[0], *paths, "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert len(df) == 3 and set(df["pred_name"]) <= {"normal", "pneumonia"}
    assert ((df["confidence"] >= 0.5) & (df["confidence"] <= 1)).all()


def test_predict_missing_file_is_a_clear_error(trained_pair, tmp_path):
    res = invoke("predict", trained_pair[0], tmp_path / "nope.png")
    assert res.exit_code == 2 and "nope.png" in res.output and "does not exist" in res.output


def test_compare_two_runs(trained_pair):
    res = invoke("compare", *trained_pair, "--n-boot", 200)
    assert res.exit_code == 0, res.output
    assert "McNemar" in res.output or "mcnemar" in res.output.lower()
    assert "auc" in res.output.lower()


def test_report_command_rewrites_report(trained_pair):
    (trained_pair[0] / "report.html").unlink()
    res = invoke("report", trained_pair[0])
    assert res.exit_code == 0 and (trained_pair[0] / "report.html").is_file()


def test_data_check_prints_fingerprint(tmp_path, tiny_pneumonia):
    res = invoke("data", "check", "--data", tiny_pneumonia, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    assert "normal" in res.output and "pneumonia" in res.output
    assert (tmp_path / "splits.json").is_file() and fp


def test_ham10000_csv_trains_with_lesion_grouped_split(tmp_path, ham_slice, ham_root):
    out = tmp_path / "ham"
    res = invoke("train", "--out", out, "--data", ham_slice, "--label-columns", "dx", "--group-column", "lesion_id",
                 "--image-size", 32, *sets(tiny_overrides(ham_slice, **{"data.image_root": str(ham_root),
                                                                     "train.max_epochs": 1})))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["class_names"]) == 7 and len(m["test"]["per_class"]["recall"]) == 7
    report = (out / "report.md").read_text()
    for name in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"):
        assert name in report


@pytest.mark.parametrize("args, needle", [
    (["train", "-s", "train.max_epoch=3"], "max_epoch"),
    (["train", "--method", "baselin"], "Did you mean 'baseline'"),
    (["train", "-s", "method.params.backbon=resnet18"], "backbon"),
    (["train", "--data", "/no/such/file.npz"], "file.npz"),
])
def test_bad_options_give_clear_errors(args, needle, tmp_path):
    res = invoke(*args, "--out", tmp_path / "x")
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_methods_lists_baseline():
    res = invoke("methods")
    assert res.exit_code == 0 and "baseline" in res.output.split()
