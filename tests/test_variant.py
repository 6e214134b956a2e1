"""benchmarks/variant.py: a recorded method rerun with changed options, compared on the same test images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_benchmark
from diffmed.bench import FINISHED
from diffmed.config import load_config, save_config

variant = load_benchmark("variant")
RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist" / "runs"


def copy_of_recorded_method(cfg, run_dir):
    """Stands in for training: the variant predicts exactly what the recorded diffmic_v2 run predicted."""
    for f in ("metrics.json", "predictions.csv", "model/model.json"):
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECORDS / "diffmic_v2-s0" / f, run_dir / f)
    save_config(cfg, run_dir / "config.yaml")
    return json.loads((run_dir / "metrics.json").read_text())


def copy_records(tmp_path, *runs):
    """The full benchmark's records of ``runs`` where variant.py looks for them."""
    for run in runs:
        shutil.copytree(RECORDS / run, tmp_path / "out" / "pneumoniamnist" / "runs" / run)


@pytest.fixture()
def argv(tmp_path):
    copy_records(tmp_path, "baseline-s0", "diffmic_v2-s0")
    return ["--dataset", "pneumoniamnist", "--method", "diffmic_v2", "--tag", "dcg", "--set",
            "method.params.feature_encoders=dcg", "--seeds", "0", "--n-boot", "50", "--data-dir", str(tmp_path),
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]


def test_variant_is_the_recorded_config_with_the_overrides_kept_and_compared(argv, tmp_path, monkeypatch):
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main(argv)
    run = tmp_path / "work" / "pneumoniamnist" / "variants" / "dcg" / "runs" / "diffmic_v2-s0"
    cfg, recorded = load_config(run / "config.yaml"), load_config(RECORDS / "diffmic_v2-s0" / "config.yaml")
    assert cfg.method.params["feature_encoders"] == "dcg" and cfg.train == recorded.train
    assert cfg.data.source == str(tmp_path / "pneumoniamnist.npz")  # the data of this machine, not the recorder's
    record = tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg" / "runs" / "diffmic_v2-s0"
    assert (record / FINISHED).is_file() and (record / "predictions.csv").is_file()
    results = json.loads((tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg.json").read_text())
    assert results["seeds"] == [0] and list(results["summaries"]) == ["baseline", "diffmic_v2", "diffmic_v2 (dcg)"]
    same = results["paired"]["diffmic_v2"][0]["metrics"]["f1_macro"]
    assert same["diff"] == 0  # identical predictions: no difference to the recorded method
    baseline = json.loads((RECORDS / "baseline-s0" / "metrics.json").read_text())["test"]["f1_macro"]
    assert results["paired"]["baseline"][0]["metrics"]["f1_macro"]["diff"] == pytest.approx(
        results["summaries"]["diffmic_v2"]["f1_macro"]["mean"] - baseline)


def test_a_new_session_reads_the_variant_back_from_its_record(argv, tmp_path, monkeypatch):
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main(argv)
    first = (tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg.md").read_text()
    val_auc = json.loads((RECORDS / "diffmic_v2-s0" / "metrics.json").read_text())["val"]["auc"]
    assert f"| {val_auc:.3f} |" in first  # the selection metric beside the test metrics
    shutil.rmtree(tmp_path / "work")
    monkeypatch.undo()  # the real run_or_resume: it must find the run finished and train nothing
    monkeypatch.setattr("diffmed.bench.train", lambda *a, **k: pytest.fail("trained a recorded run again"))
    variant.main(argv)
    assert (tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg.md").read_text() == first


def test_missing_records_and_unfinished_seeds_say_what_to_run(argv, tmp_path):
    with pytest.raises(SystemExit, match="benchmarks/full.py --datasets pneumoniamnist"):
        variant.main([*argv[:-6], "--seeds", "1", *argv[-6:]])
    with pytest.raises(SystemExit, match="no finished dcg run"):
        variant.main([*argv, "--finished-only"])


def test_one_seed_calls_in_parallel_leave_the_table_of_every_finished_seed(argv, tmp_path, monkeypatch):
    copy_records(tmp_path, "baseline-s1", "diffmic_v2-s1")
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main([*argv[:-6], "--seeds", "1", *argv[-6:]])
    variant.main(argv)  # seed 0, after seed 1 finished in another call
    results = json.loads((tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg.json").read_text())
    assert results["seeds"] == [0, 1] and len(results["paired"]["baseline"]) == 2


def test_the_recorded_generator_stage_is_put_back_where_recorded_configs_point(argv, tmp_path, monkeypatch):
    """A D-Cube config's generator_run names the work folder's stage; a fresh machine has only the record."""
    stage = Path("pneumoniamnist") / "stages" / "generator-s0"
    shutil.copytree(RECORDS.parent / stage.relative_to("pneumoniamnist"), tmp_path / "out" / stage)
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main(argv)
    restored = tmp_path / "work" / stage / "generator"
    assert (restored / "model.json").is_file() and (restored / "model.safetensors").is_file()


def test_more_recorded_methods_are_rows_and_paired_references(argv, tmp_path, monkeypatch):
    copy_records(tmp_path, "class_weighted-s0")
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main([*argv, "--also", "class_weighted"])
    results = json.loads((tmp_path / "out" / "pneumoniamnist" / "variants" / "dcg.json").read_text())
    assert list(results["summaries"]) == ["baseline", "class_weighted", "diffmic_v2", "diffmic_v2 (dcg)"]
    weighted = json.loads((RECORDS / "class_weighted-s0" / "metrics.json").read_text())["test"]["auc"]
    assert results["paired"]["class_weighted"][0]["metrics"]["auc"]["diff"] == pytest.approx(
        results["summaries"]["diffmic_v2"]["auc"]["mean"] - weighted)


def test_another_variant_of_the_method_is_a_reference_by_its_tag(argv, tmp_path, monkeypatch):
    monkeypatch.setattr(variant, "run_or_resume", copy_of_recorded_method)
    variant.main(argv)
    tag = argv.index("--tag") + 1
    variant.main([*argv[:tag], "other", *argv[tag + 1:], "--also", "dcg"])
    results = json.loads((tmp_path / "out" / "pneumoniamnist" / "variants" / "other.json").read_text())
    assert list(results["summaries"]) == ["baseline", "dcg", "diffmic_v2", "diffmic_v2 (other)"]
    assert results["paired"]["dcg"][0]["metrics"]["f1_macro"]["diff"] == 0  # both copy the same predictions
    copy_records(tmp_path, "baseline-s1", "diffmic_v2-s1")  # seed 1 of everything but the dcg variant
    with pytest.raises(SystemExit, match="no finished record .*dcg.*-s1 for the table of seeds"):
        variant.main([*argv[:tag], "other", *argv[tag + 1:-6], "--seeds", "1", *argv[-6:], "--also", "dcg"])
