"""``diffmed augment`` and ``diffmed generator eval`` end to end on real data slices and a tiny generator."""
from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from diffmed.cli import app
from diffmed.config import load_config
from diffmed.engine.data import prepare_data

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def printed_train_config(result, tmp_path, monkeypatch):
    """Run the ``diffmed train`` command ``diffmed augment`` printed, stopping at the resolved config."""
    import diffmed.engine.run

    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("diffmed train")]
    seen = {}
    monkeypatch.setattr(diffmed.engine.run, "train", lambda cfg, run_dir, resume=False: seen.update(cfg=cfg))
    res = runner.invoke(app, shlex.split(line)[1:] + ["--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    return seen["cfg"]


def test_augment_manifest_is_loaded_by_train_as_synthetic_training_rows_only(tmp_path, tiny_pneumonia, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the printed command uses the paths as given
    res = invoke("augment", "--data", tiny_pneumonia, "--strategy", "unbalanced", "--k", 2, "--methods",
                 "rotation,flipping", "--out", "aug", "-s", "data.split_seed=3")
    assert res.exit_code == 0, res.output
    manifest = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    real = load_config(None, [f"data.source={tiny_pneumonia}"])
    counts = dict(zip(*np.unique(manifest["label"], return_counts=True)))
    # 96 real training images: 18 normal (minority, 2 new each), 78 pneumonia (a third once)
    assert counts == {"normal": 36, "pneumonia": 26}
    assert (manifest["synthetic"] == 1).all() and manifest["id"].str.startswith("aug/train/").all()
    assert all((tmp_path / "aug" / "images" / p).is_file() for p in manifest["path"])
    assert "normal" in res.output and "+     36 new" in res.output and "+     26 new" in res.output
    info = json.loads((tmp_path / "aug" / "augment.json").read_text())
    assert info["methods"] == ["rotation", "flipping"] and info["added"] == {"normal": 36, "pneumonia": 26}

    cfg = printed_train_config(res, tmp_path, monkeypatch)
    assert cfg.data.synthetic == ["aug/manifest.csv"] and cfg.data.split_seed == 3  # the user's -s kept
    data = prepare_data(cfg, tmp_path / "run")
    plain = prepare_data(real.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": []})}),
                         tmp_path / "plain")
    train = data.sets["train"]
    assert len(train) == 96 + 62 and int(train.synthetic.sum()) == 62
    assert train.class_counts().tolist() == [18 + 36, 78 + 26]
    for split in ("val", "test"):  # never touched: the same rows as without augmentation, none synthetic
        assert data.sets[split].ids == plain.sets[split].ids
        assert data.sets[split].synthetic is None or not data.sets[split].synthetic.any()
    # the training split augment started from is the one train uses
    assert (json.loads((tmp_path / "aug" / "splits.json").read_text())["splits"]
            == json.loads((tmp_path / "run" / "splits.json").read_text())["splits"])
    np.testing.assert_array_equal(train.images[~train.synthetic], plain.sets["train"].images)


@pytest.mark.parametrize("args, needles", [
    (["--strategy", "misclassified"], ["--model", "misclassified"]),
    (["--strategy", "unbalance"], ["--strategy", "Did you mean 'unbalanced'"]),
    (["--producer", "diffusion"], ["--generator", "diffmed generator train"]),
    (["--producer", "gan"], ["--producer", "traditional, diffusion, mixed"]),
    (["--methods", "rotation,sepia"], ["--methods", "sepia"]),
])
def test_bad_augment_options_are_one_clear_message(args, needles, tmp_path, tiny_pneumonia):
    res = invoke("augment", "--data", tiny_pneumonia, "--out", tmp_path / "aug", *args)
    assert res.exit_code == 2, res.output
    assert all(n in res.output for n in needles) and "Traceback" not in res.output
    assert not (tmp_path / "aug").exists()  # refused before anything is written


def test_augment_misclassified_with_a_trained_model(tmp_path, tiny_pneumonia):
    model = tmp_path / "model"
    res = invoke("train", "--data", tiny_pneumonia, "--out", model, "-s", "train.max_epochs=1",
                 "-s", "train.limit_train_batches=2", "-s", "train.batch_size=32", "-s", "train.progress=false",
                 "-s", "eval.bootstrap=20", "-s", "method.params.backbone=resnet18")
    assert res.exit_code == 0, res.output
    res = invoke("augment", "--data", tiny_pneumonia, "--strategy", "misclassified", "--model", model, "--k", 3,
                 "--out", tmp_path / "aug")
    assert res.exit_code == 0, res.output
    picked = json.loads((tmp_path / "aug" / "augment.json").read_text())["misclassified"]
    assert 0 < len(picked["rows"]) <= picked["misclassified"]
    manifest = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    assert len(manifest) == 3 * len(picked["rows"])
    assert manifest["label"].value_counts().reindex(["normal", "pneumonia"], fill_value=0).tolist() == [
        3 * n for n in picked["per_class"]]


def test_augment_mixed_producer_samples_the_generator(tmp_path, tiny_pneumonia, tiny_generator_run):
    res = invoke("augment", "--data", tiny_pneumonia, "--producer", "mixed", "--generator", tiny_generator_run,
                 "--steps", 2, "--k", 1, "--out", tmp_path / "aug")
    assert res.exit_code == 0, res.output
    manifest = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    kinds = manifest["id"].str.split("/").str[0]
    assert len(manifest) == 18 + 26 and set(kinds) == {"aug", "gen"}
    assert (tmp_path / "aug" / "generated" / "manifest.csv").is_file()


def test_generator_eval_reports_per_class_metrics_and_feature_space(tmp_path, tiny_generator_run, monkeypatch):
    out = tmp_path / "eval.json"
    res = invoke("generator", "eval", tiny_generator_run, "--per-class", 4, "--steps", 2, "--features", "domain",
                 "--feature-epochs", 1, "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["feature_space"].startswith("domain:resnet18:")
    assert set(report["per_class"]) == {"normal", "pneumonia"}
    for m in [*report["per_class"].values(), report["overall"]]:
        for key in ("fid", "kid", "precision", "recall", "ssim", "psnr"):
            assert math.isfinite(m[key]), key
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and -1 <= m["ssim"] <= 1
    assert [m["n_fake"] for m in report["per_class"].values()] == [4, 4]
    assert [m["n_real"] for m in report["per_class"].values()] == [18, 78]  # the run's real training split
    assert report["generated"]["steps"] == 2 and report["feature_extractor"]["epochs"] == 1
    for text in ("normal", "pneumonia", "overall", "FID", "KID", "SSIM", "PSNR", report["feature_space"]):
        assert text in res.output

    # scoring the same images from their manifest, default output, "auto" without Inception weights on disk:
    # the cached domain extractor is reused, so the numbers are the same
    import diffmed.evaluation.generation as gm

    monkeypatch.setattr(gm, "find_inception_weights", lambda: None)
    res = invoke("generator", "eval", tiny_generator_run, "--synthetic", report["generated"]["manifest"],
                 "--feature-epochs", 1)
    assert res.exit_code == 0, res.output
    again = json.loads((tiny_generator_run / "generation_eval.json").read_text())
    assert again["feature_space"] == report["feature_space"]
    assert again["per_class"]["normal"]["fid"] == pytest.approx(report["per_class"]["normal"]["fid"])
    assert again["generated"] == {"manifest": report["generated"]["manifest"]}

    bad = invoke("generator", "eval", tiny_generator_run, "--features", "clip")
    assert bad.exit_code == 2 and "--features" in bad.output
