"""benchmarks/dcube.py carries its finished arms and generators across sessions through committed records."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_benchmark
from diffmed.bench import FINISHED
from diffmed.config import load_config, save_config
from diffmed.errors import RunError

dc = load_benchmark("dcube")
DATASET = "pneumoniamnist"


class Trained(Exception):
    """Raised by the stand-ins of training: the benchmark tried to train."""


def refuse_training(*_, **__):
    raise Trained


@pytest.fixture()
def bench_args(tmp_path, shared_data):
    """The benchmark's own argument parsing, its work and records in ``tmp_path``."""
    def parse(work: str = "work"):
        return dc.parse_args(["--datasets", DATASET, "--seeds", "1", "--gen-size", "tiny",
                              "--data-dir", str(shared_data), "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / work)])
    return parse


def write_files(folder, names) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")


def files(folder) -> list[str]:
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())


def fake_generator_training(cfg, run_dir, params, resume=False):
    write_files(run_dir, ["config.yaml", "splits.json", "generator_params.json", "last.ckpt",
                          "generator/model.safetensors", "logs/samples/epoch_0001.png"])
    (run_dir / "generator" / "model.json").write_text(json.dumps({"train_seconds": 1234.5}))
    return run_dir


def test_a_committed_arm_is_read_back_without_training_it_or_its_generator(bench_args, monkeypatch):
    args = bench_args()
    record = args.out / "records" / DATASET / "t4_baseline-s0"  # the arm of the "plain" generator
    metrics = {"test": {"acc": 0.9}}
    write_files(record, ["predictions.csv", "model/model.json"])
    planned = dc.arm_overrides(args, DATASET, 0, "t4_baseline", build=False)
    save_config(load_config(None, planned), record / "config.yaml")
    (record / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(dc, "run_or_resume", refuse_training)
    monkeypatch.setattr(dc, "train_generator", refuse_training)
    dc.restore_dcube_records(args)
    with pytest.raises(Trained):  # a record cut short (no .finished) is not trusted: the arm is trained again
        dc.run_arm(args, DATASET, 0, "t4_baseline")
    (record / FINISHED).write_text("metrics.json\n")
    dc.restore_dcube_records(args)
    assert dc.run_arm(args, DATASET, 0, "t4_baseline") == (metrics, args.work / DATASET / "t4_baseline-s0")
    assert not (args.work / DATASET / "generator-plain-s0").exists()
    stale = args.work / DATASET / "t4_baseline-s0" / "config.yaml"
    save_config(load_config(None, [*planned, "train.max_epochs=3"]), stale)
    with pytest.raises(RunError, match="train.max_epochs: 3 -> "):  # a run left by other settings is not read back
        dc.run_arm(args, DATASET, 0, "t4_baseline")


def test_a_finished_arm_keeps_what_the_report_reads_but_no_weights(bench_args, monkeypatch):
    def fake_training(overrides, run_dir):
        write_files(run_dir, ["config.yaml", "metrics.json", "predictions.csv", "model/model.json",
                              "model/model.safetensors", "last.ckpt", "splits.json", "stages/dcube_selection.json",
                              "stages/subfeatures/model.safetensors", "stages/gaussianity/gaussianity.png",
                              "stages/gaussianity/gaussianity.md", "stages/gaussianity/gaussianity.csv",
                              "stages/gaussianity/selection.json"])

    monkeypatch.setattr(dc, "run_or_resume", fake_training)
    monkeypatch.setattr(dc, "train_generator", fake_generator_training)
    args = bench_args()
    for arm, seed in (("baseline", 0), ("dcube_worst", 0), ("dcube_worst", 1)):
        dc.run_arm(args, DATASET, seed, arm)
    records = args.out / "records" / DATASET
    run = [".finished", "config.yaml", "metrics.json", "model/model.json", "predictions.csv"]
    assert files(records / "baseline-s0") == run
    assert files(records / "dcube_worst-s1") == sorted(run + ["stages/dcube_selection.json"])
    assert files(records / "dcube_worst-s0") == sorted(run + [  # the first seed's, for Fig. 2
        "stages/dcube_selection.json", "stages/gaussianity/gaussianity.md", "stages/gaussianity/gaussianity.png",
        "stages/gaussianity/selection.json"])


def test_a_finished_generator_keeps_its_weights_and_a_new_work_folder_trains_on_them(bench_args, monkeypatch):
    monkeypatch.setattr(dc, "train_generator", fake_generator_training)
    args = bench_args()
    dc.generator(args, DATASET, 0, "lgen")
    record = args.out / "records" / DATASET / "generator-lgen-s0"
    assert files(record) == [".finished", "config.yaml", "generator/model.json", "generator/model.safetensors",
                             "splits.json"]

    asked = {}
    monkeypatch.setattr(dc, "train_generator", refuse_training)
    monkeypatch.setattr(dc, "run_or_resume", lambda overrides, run_dir: asked.update(overrides=overrides) or
                        refuse_training())
    moved = bench_args("moved")
    dc.restore_dcube_records(moved)
    own = moved.work / DATASET / "generator-lgen-s0"
    assert dc.generator_seconds(own) == 1234.5
    with pytest.raises(Trained):  # the arm trains (refused here) on the restored generator, not a new one
        dc.run_arm(moved, DATASET, 0, "dcube")
    assert f"method.params.generator_run={json.dumps(str(own))}" in asked["overrides"]


def test_generator_batch_and_lr_options_reach_the_generator_and_leave_the_classifiers_alone(tmp_path, shared_data,
                                                                                          monkeypatch):
    seen = {}

    def record_training(cfg, run_dir, params, resume=False):
        seen.update(batch=cfg.train.batch_size, params=params)
        return fake_generator_training(cfg, run_dir, params, resume)

    monkeypatch.setattr(dc, "train_generator", record_training)
    args = dc.parse_args(["--datasets", DATASET, "--seeds", "1", "--gen-size", "tiny", "--gen-batch-size", "32",
                          "--gen-lr", "5e-4", "--data-dir", str(shared_data), "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")])
    dc.generator(args, DATASET, 0, "plain")
    assert seen["batch"] == 32 and seen["params"]["lr"] == 5e-4 and not seen["params"]["use_contrastive"]
    classifier = load_config(None, dc.arm_overrides(args, DATASET, 0, "t4_baseline", build=False))
    assert classifier.train.batch_size == 64


def test_finished_only_writes_the_ablation_tables_from_finished_runs_and_trains_nothing(tmp_path, shared_data,
                                                                                      monkeypatch):
    recorded = Path(__file__).resolve().parents[1] / "benchmarks/results/dcube/ablation/records" / DATASET / "dcube-s0"
    args = dc.parse_args(["--ablation-only", "--finished-only", "--datasets", DATASET, "--seeds", "2",
                          "--n-boot", "50", "--data-dir", str(shared_data), "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")])
    for arm in ("dcube", "t4_fs"):  # seed 0 finished for both (the same predictions), seed 1 for neither
        shutil.copytree(recorded, args.work / DATASET / f"{arm}-s0")
    monkeypatch.setattr(dc, "run_or_resume", refuse_training)
    monkeypatch.setattr(dc, "train_generator", refuse_training)
    monkeypatch.setattr(dc, "check_same_settings", lambda *a, **k: None)  # the record's paths are another machine's
    results, md = dc.ablations(args, DATASET)
    assert set(results["rows"]) == {"dcube", "t4_fs"} and results["rows"]["dcube"]["n_seeds"] == 1
    assert results["paired_vs_full"]["t4_fs"][0]["metrics"]["acc"]["diff"] == 0
    row = next(line for line in md.splitlines() if line.startswith("| + Fs"))
    assert "+0.000" in row and "not finished" in next(line for line in md.splitlines() if line.startswith("| + L_Gen"))
    assert "seeds 0)" in md
    assert len({line.count("|") for line in md.splitlines() if line.startswith("| + ")}) == 1  # same columns
    with pytest.raises(SystemExit):
        dc.parse_args(["--finished-only"])  # the main comparison has no finished-only mode


def test_finished_only_needs_the_full_method(tmp_path, shared_data):
    args = dc.parse_args(["--ablation-only", "--finished-only", "--datasets", DATASET, "--data-dir", str(shared_data),
                          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    with pytest.raises(SystemExit, match="no finished full D-Cube run"):
        dc.ablations(args, DATASET)


def test_arms_trains_only_those_arms_and_reports_the_others_finished_seeds(tmp_path, shared_data, monkeypatch):
    recorded = Path(__file__).resolve().parents[1] / "benchmarks/results/dcube/ablation/records" / DATASET / "dcube-s0"
    args = dc.parse_args(["--ablation-only", "--arms", "t4_fs", "--datasets", DATASET, "--seeds", "2",
                          "--n-boot", "50", "--data-dir", str(shared_data), "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")])
    # the full method has finished seed 0; its seed 1 is left to another process
    shutil.copytree(recorded, args.work / DATASET / "dcube-s0")
    trained = []

    def fake_training(cfg, run_dir):
        trained.append(run_dir.name)
        shutil.copytree(recorded, run_dir, dirs_exist_ok=True)

    monkeypatch.setattr(dc, "run_or_resume", fake_training)
    monkeypatch.setattr(dc, "generator", lambda *a, **k: tmp_path / "generator")
    monkeypatch.setattr(dc, "check_same_settings", lambda *a, **k: None)
    results, _ = dc.ablations(args, DATASET)
    assert trained == ["t4_fs-s0", "t4_fs-s1"]
    assert results["rows"]["dcube"]["n_seeds"] == 1 and results["rows"]["t4_fs"]["n_seeds"] == 2
    with pytest.raises(SystemExit):
        dc.parse_args(["--arms", "t4_fs"])  # the main comparison needs every arm
