"""benchmarks/diffmic.py carries its finished runs across sessions through committed records, without weights."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from conftest import load_benchmark
from diffmed import bench
from diffmed.bench import FINISHED
from diffmed.config import load_config, save_config

dm = load_benchmark("diffmic")
FINISHED_RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist" / "runs" / "baseline-s0"
"""A real finished run's record (committed by the full benchmark)."""
PRIOR = {"acc": 0.7, "auc": 0.8, "f1_macro": 0.6, "balanced_acc": 0.65}


class Trained(Exception):
    """Raised by the stand-ins: the benchmark tried to train or to load weights."""


def refuse(*_, **__):
    raise Trained


@pytest.fixture()
def args(tmp_path):
    return argparse.Namespace(work=tmp_path / "work", out=tmp_path / "out", data_dir=tmp_path, limit_train_batches=None,
                              set=[], batch_size=64, lr=1e-3, augment="standard", dcg_epochs=None, n_samples=1)


def fake_training(overrides, run_dir):
    for f in ("metrics.json", "predictions.csv", "model/model.json"):
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FINISHED_RUN / f, run_dir / f)
    save_config(load_config(None, overrides), run_dir / "config.yaml")  # what is read back must match the plan
    (run_dir / "model" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "last.ckpt").write_bytes(b"checkpoint")
    return json.loads((run_dir / "metrics.json").read_text())


def test_a_finished_run_keeps_its_prior_metrics_but_no_weights_and_is_read_back_without_them(args, monkeypatch):
    monkeypatch.setattr(dm, "run_or_resume", fake_training)
    monkeypatch.setattr(bench, "trained_run", lambda run_dir: (None, None, None, None))
    monkeypatch.setattr(dm, "split_metrics", lambda *a, **k: PRIOR)
    metrics, run_dir = dm.run(args, "pneumoniamnist", "full", 8, 0)
    record = dm.record_of(args, run_dir)
    assert record == args.out / "records" / "pneumoniamnist" / "full-e8-s0"
    assert sorted(str(f.relative_to(record)) for f in record.rglob("*") if f.is_file()) == [
        FINISHED, "config.yaml", "metrics.json", "model/model.json", "predictions.csv", dm.PRIOR_ALONE]

    shutil.rmtree(args.work)  # a new session: the work folder is gone, the committed records are not
    monkeypatch.undo()
    monkeypatch.setattr(bench, "trained_run", refuse)
    dm.restore_diffmic_records(args)
    again, _ = dm.run(args, "pneumoniamnist", "full", 8, 0)  # the real run_or_resume: finished, so read back
    assert again == metrics and dm.prior_alone(run_dir) == PRIOR
    assert dm.seeds_to_report(argparse.Namespace(**vars(args), seeds=[0, 1], finished_only=True),
                              "pneumoniamnist", ("full",), 8) == [0]


def test_a_record_without_weights_says_what_to_delete_when_a_sweep_needs_them(args, monkeypatch):
    run_dir = dm.run_dir_of(args, "pneumoniamnist", "full", 8, 0)
    fake_training([], run_dir)
    (run_dir / "model" / "model.safetensors").unlink()
    monkeypatch.setattr(bench, "trained_run", refuse)
    with pytest.raises(SystemExit, match="full-e8-s0 holds a record without the weights that the inference sweep"):
        dm.sweep_run(run_dir)
