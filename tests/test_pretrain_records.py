"""benchmarks/pretrain.py carries its finished runs across sessions through committed records, without weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark
from diffmed.bench import FINISHED

pt = load_benchmark("pretrain")
FINISHED_RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist" / "runs" / "baseline-s0"
"""A real finished run's record (committed by the full benchmark): what a pretrain.py row's record holds."""


class Trained(Exception):
    """Raised by the stand-ins of training: the benchmark tried to train or pre-train."""


def refuse_training(*_, **__):
    raise Trained


@pytest.fixture()
def budget():
    return {**pt.TINY, "rows": list(pt.ROWS), "cost_seed": 0}


def write_run(run_dir: Path, weights: bool = True) -> None:
    for f in pt.RECORD[:4]:
        (run_dir / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FINISHED_RUN / f, run_dir / f)
    if weights:
        (run_dir / "model" / "model.safetensors").write_bytes(b"weights")


def test_a_committed_row_is_read_back_without_pre_training_or_tuning(tmp_path, budget, monkeypatch):
    records, work = tmp_path / "records", tmp_path / "work"
    write_run(records / "runs" / "dit_rep_probe-s0", weights=False)
    monkeypatch.setattr(pt, "pretrained", refuse_training)
    monkeypatch.setattr(pt, "run_or_resume", refuse_training)
    pt.restore_pretrain_records(records, work)
    with pytest.raises(Trained):  # a record cut short (no .finished) is not trusted: the row is tuned again
        pt.run("dit_rep_probe", Path("data.npz"), 0, budget, work)
    (records / "runs" / "dit_rep_probe-s0" / FINISHED).write_text("metrics.json\n")
    pt.restore_pretrain_records(records, work)
    result, run_dir = pt.run("dit_rep_probe", Path("data.npz"), 0, budget, work)
    assert run_dir == work / "runs" / "dit_rep_probe-s0"
    assert result["test"]["acc"] == json.loads((FINISHED_RUN / "metrics.json").read_text())["test"]["acc"]
    assert {"recall_macro", "precision_macro"} <= set(result["test_ci"])  # the CIs come from the restored predictions


def test_tuned_rows_derive_their_rescored_rows_and_cost_while_their_weights_are_there(tmp_path, budget, monkeypatch):
    work, records = tmp_path / "work", tmp_path / "records"
    derived = []
    monkeypatch.setattr(pt, "pretrained", lambda kind, *_: work / "pretrain" / f"{kind}-s0")
    monkeypatch.setattr(pt, "run_or_resume", lambda overrides, run_dir: write_run(run_dir) or
                        json.loads((run_dir / "metrics.json").read_text()))

    def fake_rescore(base_dir, out_dir, score, norm):
        assert (base_dir / "model" / "model.safetensors").is_file()
        derived.append(out_dir.name)
        write_run(out_dir, weights=False)
        (out_dir / "rescored.json").write_text(json.dumps({"from": str(base_dir), "score": score}))

    def fake_cost(run_dir, n_images):
        derived.append(f"cost of {run_dir.name}")
        (run_dir / "pruning_cost.json").write_text(json.dumps({"n_images": n_images, "rows": []}))

    monkeypatch.setattr(pt, "rescore", fake_rescore)
    monkeypatch.setattr(pt, "classifier_cost", fake_cost)
    monkeypatch.setattr(pt, "noise_trials_table", lambda run_dir: derived.append(f"noise draws of {run_dir.name}"))
    pt.run("dit_rep_zero", Path("data.npz"), 0, budget, work)
    assert derived == ["dit_rep_zero_b-s0", "dit_rep_zero_pt-s0", "dit_rep_eps-s0", "cost of dit_rep_zero-s0"]
    pt.keep_records(work, records, [0])
    kept = sorted(str(f.relative_to(records / "runs" / "dit_rep_zero-s0"))
                  for f in (records / "runs" / "dit_rep_zero-s0").rglob("*") if f.is_file())
    assert kept == [FINISHED, "config.yaml", "metrics.json", "model/model.json", "predictions.csv", "pruning_cost.json"]
    assert (records / "runs" / "dit_rep_eps-s0" / "rescored.json").is_file()
    # a table derived after the record was kept joins it; what the record holds is never overwritten
    (work / "runs" / "dit_rep_zero-s0" / "noise_trials.json").write_text("{}")
    (work / "runs" / "dit_rep_zero-s0" / "metrics.json").write_text("changed")
    pt.keep_records(work, records, [0])
    assert (records / "runs" / "dit_rep_zero-s0" / "noise_trials.json").read_text() == "{}"
    assert (records / "runs" / "dit_rep_zero-s0" / "metrics.json").read_text() != "changed"

    derived.clear()
    budget["cost_seed"] = 1  # another seed's Zero row is not timed, and rows not asked for are not re-scored
    budget["rows"] = ["dit_rep_zero", "dit_rep_eps"]
    pt.run("dit_rep_zero", Path("data.npz"), 2, budget, work)
    assert derived == ["dit_rep_eps-s2"]

    derived.clear()
    budget.update(cost_seed=2, generation=True)  # a row tuned under its own epsilon readout is timed and its
    monkeypatch.setattr(pt, "generation_metrics",  # class-conditioned generation scored; it re-scores nothing
                        lambda work, data, seed, s: derived.append(f"generation of seed {seed}"))
    pt.run("dit_rep_eps_sel", Path("data.npz"), 2, budget, work)
    assert derived == ["noise draws of dit_rep_eps_sel-s2", "cost of dit_rep_eps_sel-s2", "generation of seed 2"]


def test_noise_draws_table_marks_the_count_chosen_on_validation_per_seed(tmp_path):
    def row(trials, val_auc, test_acc):
        metrics = {m: 0.5 for m in pt.METRICS}
        return {"noise_trials": trials, "forward_passes_per_image": 18 * trials, "seconds_per_image": 0.01 * trials,
                "val": {**metrics, "auc": val_auc}, "test": {**metrics, "acc": test_acc}}

    assert pt.noise_trials_md(tmp_path) == ""
    for seed, aucs in ((0, (0.90, 0.93, 0.93, 0.92)), (1, (0.95, 0.91, 0.90, 0.90))):
        folder = tmp_path / "runs" / f"dit_rep_eps_sel-s{seed}"
        folder.mkdir(parents=True)
        rows = [row(t, a, 0.8 + i / 100) for i, (t, a) in enumerate(zip(pt.NOISE_TRIALS, aucs))]
        (folder / "noise_trials.json").write_text(json.dumps({"rows": rows}))
    lines = [line for line in pt.noise_trials_md(tmp_path).splitlines() if line.startswith("| Representation")]
    assert len(lines) == 8
    chosen = [line.split("|")[2:4] for line in lines if line.rstrip(" |").endswith("yes")]
    assert chosen == [[" 0 ", " 2 "], [" 1 ", " 1 "]]  # the best validation AUC; fewer passes on a tie
    assert " 0.810 " in lines[1]  # test metrics are shown for every count, chosen or not


def test_a_rescored_row_whose_zero_row_lost_its_weights_says_what_to_delete(tmp_path, budget, monkeypatch):
    work = tmp_path / "work"
    write_run(work / "runs" / "dit_uncond_zero-s0", weights=False)
    monkeypatch.setattr(pt, "rescore", refuse_training)
    with pytest.raises(SystemExit, match="dit_uncond_zero-s0.*delete that folder"):
        pt.run("dit_uncond_eps", Path("data.npz"), 0, budget, work)


def test_only_a_finished_pre_training_keeps_its_loss_log_and_it_is_not_put_back_as_weights(tmp_path):
    work, records = tmp_path / "work", tmp_path / "records"
    pre = work / "pretrain" / "representation-s0"
    (pre / pt.LOSS_LOG).parent.mkdir(parents=True)
    (pre / pt.LOSS_LOG).write_text("step,train/loss\n0,1.0\n")
    pt.keep_records(work, records, [0])
    assert not (records / "pretrain" / "representation-s0").exists()  # killed mid-way: its log is partial
    (pre / pt.PRETRAINED).parent.mkdir(parents=True)
    (pre / pt.PRETRAINED).write_text("{}")
    pt.keep_records(work, records, [0])
    assert (records / "pretrain" / "representation-s0" / pt.LOSS_LOG).is_file()
    shutil.rmtree(work)
    pt.restore_pretrain_records(records, work)
    assert not (work / "pretrain").exists()
    assert pt.loss_curves(records, [0], tmp_path / "loss.png") == {"representation-s0": 1.0}


def test_generation_scores_each_model_once_while_its_weights_are_here_and_records_merge(tmp_path, budget, monkeypatch):
    work, records = tmp_path / "work", tmp_path / "records"
    scored = []
    monkeypatch.setattr(pt, "prepare_data", lambda cfg, run_dir: type("D", (), {"sets": {"train": FakeSet()}})())
    monkeypatch.setattr(pt, "generate", lambda weights, name, seed, real, labels: scored.append(name) or real)
    import diffmed.evaluation.generation as generation
    monkeypatch.setattr(generation, "default_extractor", lambda *a, **k: None)
    monkeypatch.setattr(generation, "generation_report",
                        lambda real, fake, fx, **k: {"feature_space": "f", "overall": {"fid": 1.0}})
    (work / "pretrain" / "unconditional-s0" / "stages" / "pretrain" / "model").mkdir(parents=True)
    assert list(pt.generation_metrics(work, Path("data.npz"), 0, budget)) == ["unconditional"]
    write_run(run_dir := pt.run_dir_of(work, "dit_uncond_eps_sel", 0))  # a tuned class-conditioned DiT with weights
    write_run(pt.run_dir_of(work, "dit_rep_eps_sel", 0), weights=False)  # a record only: it cannot be scored
    assert list(pt.generation_metrics(work, Path("data.npz"), 0, budget)) == [
        "unconditional", "class, tuned from unconditional"]
    assert scored == ["unconditional", "class, tuned from unconditional"]  # nothing is scored twice
    pt.keep_records(work, records, [0])
    fresh = tmp_path / "fresh"  # another machine scores another model before the records come back: both are kept
    (fresh / "generation-s0.json").parent.mkdir(parents=True)
    (fresh / "generation-s0.json").write_text(json.dumps({"representation": {"fid": 2.0}}))
    pt.restore_pretrain_records(records, fresh)
    assert set(json.loads((fresh / "generation-s0.json").read_text())) == {
        "unconditional", "class, tuned from unconditional", "representation"}
    assert run_dir.is_dir()


class FakeSet:
    """The training split generation compares with: four images, two classes."""

    images = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    targets = np.array([0, 1, 0, 1])
    ids = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return len(self.images)
