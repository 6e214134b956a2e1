"""benchmarks/rebalance.py carries its finished arms and generators across machines through committed records."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import load_benchmark, slice_npz
from diffmed.bench import FINISHED
from diffmed.config import load_config, save_config
from diffmed.errors import RunError

rb = load_benchmark("rebalance")


class Trained(Exception):
    """Raised by the stand-ins of training: the benchmark tried to train."""


@pytest.fixture()
def bench_args(tmp_path, shared_data, monkeypatch):
    """The benchmark's own argument parsing on a small slice of the real imbalanced set."""
    data = tmp_path / "data"
    data.mkdir()
    slice_npz(shared_data / "pneumoniamnist_imbalanced.npz", data / "pneumoniamnist_imbalanced.npz",
              {"train": 64, "val": 16, "test": 16})

    def parse(*extra: str):
        monkeypatch.setattr(sys, "argv", ["rebalance.py", "--data-dir", str(data), "--out", str(tmp_path / "out"),
                                          "--work", str(tmp_path / "work"), "--generator-size", "tiny", *extra])
        return rb.parse_args()
    return parse


def refuse_training(*_, **__):
    raise Trained


def test_a_committed_arm_is_read_back_without_training_it_or_sampling_its_images(bench_args, monkeypatch):
    args = bench_args("--finished-only")
    record = args.out / "records" / "runs" / "diff-balanced-s0"
    record.mkdir(parents=True)
    metrics = {"test": {"f1_macro": 0.8}}
    (record / "metrics.json").write_text(json.dumps(metrics))
    (record / rb.SYNTHETIC_COUNT).write_text(json.dumps({"images": 3106}))
    monkeypatch.setattr(rb, "run_or_resume", refuse_training)
    bench = rb.Bench(args)
    monkeypatch.setattr(bench, "augmented_manifest", refuse_training)
    with pytest.raises(Trained):  # a record cut short (no .finished) is not trusted: the arm is trained again
        bench.run_arm(rb.ARMS["diff-balanced"], 0)
    (record / FINISHED).write_text("metrics.json\n")
    bench = rb.Bench(args)
    monkeypatch.setattr(bench, "augmented_manifest", refuse_training)
    assert bench.run_arm(rb.ARMS["diff-balanced"], 0) == metrics
    assert rb._synthetic_count(bench, rb.ARMS["diff-balanced"], 0) == 3106
    planned = bench.arm_overrides(rb.ARMS["diff-balanced"], 0, build=False)
    save_config(load_config(None, planned), bench.run_dir("diff-balanced", 0) / "config.yaml")
    assert bench.run_arm(rb.ARMS["diff-balanced"], 0) == metrics
    save_config(load_config(None, [*planned, "train.max_epochs=3"]), bench.run_dir("diff-balanced", 0) / "config.yaml")
    with pytest.raises(RunError, match="train.max_epochs: 3 -> "):  # a run left by other settings is not read back
        bench.run_arm(rb.ARMS["diff-balanced"], 0)


def test_a_finished_arm_keeps_what_the_report_reads_but_no_weights(bench_args, monkeypatch):
    def fake_training(overrides, run_dir):
        for name in ("config.yaml", "metrics.json", "predictions.csv", "model/model.json", "model/model.safetensors",
                     "last.ckpt"):
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text("{}")

    monkeypatch.setattr(rb, "run_or_resume", fake_training)
    bench = rb.Bench(bench_args())
    bench.run_arm(rb.ARMS["weighted"], 0)
    record = bench.records / "runs" / "weighted-s0"
    assert sorted(str(f.relative_to(record)) for f in record.rglob("*") if f.is_file()) == [
        ".finished", "config.yaml", "metrics.json", "model/model.json", "predictions.csv", rb.SYNTHETIC_COUNT]


def test_a_full_benchmark_generator_is_reused_only_when_trained_as_this_one_would_be(bench_args, monkeypatch):
    from diffmed.diffusion import generative

    asked = {}

    def record_request(cfg, run_dir, params, resume=False):
        asked.update(cfg=cfg, params=params)
        raise Trained

    monkeypatch.setattr(generative, "train_generator", record_request)
    args = bench_args("--generator-epochs", "20", "--generator-lr", "5e-4")
    with pytest.raises(Trained):
        rb.Bench(args).generator(0)  # nothing to reuse: it trains
    source = args.out.parent / "full" / "generator-s0"
    (source / "generator").mkdir(parents=True)
    save_config(asked["cfg"], source / "config.yaml")
    trained = generative.parse_params({**asked["params"], "sample_every_n_epochs": 10}).model_dump()
    meta = {"params": trained, "seed": 0, "epochs": 20, "train_seconds": 1944.9}
    (source / "generator" / "model.json").write_text(json.dumps(meta))
    (source / "generator" / "model.safetensors").write_text("weights")
    (source / ".finished").write_text("generator/model.json\n")

    other_lr = bench_args("--generator-epochs", "20", "--generator-lr", "2e-4", "--generators-from", str(source.parent))
    with pytest.raises(Trained):
        rb.Bench(other_lr).generator(0)
    same = bench_args("--generator-epochs", "20", "--generator-lr", "5e-4", "--generators-from", str(source.parent))
    bench = rb.Bench(same)
    run_dir = bench.generator(0)  # sampling settings differ; the weights' training does not
    assert (run_dir / "generator" / "model.safetensors").read_text() == "weights"
    cost = json.loads((run_dir / "bench_cost.json").read_text())
    assert cost["train_seconds"] == 1944.9 and cost["reused_from"] == str(source)
    assert (bench.records / "generators" / "lcont-s0" / "generator" / "model.safetensors").is_file()
    with pytest.raises(Trained):
        bench.generator(0, contrastive=False)  # the ablation generator is never the full benchmark's


def test_generation_only_reports_the_kept_table_without_training_and_a_reused_generator_has_no_memory(
        bench_args, monkeypatch):
    committed = rb.Path(rb.__file__).parent / "results" / "rebalance" / "generation" / "s0.json"
    args = bench_args("--generation-only", "--seeds", "0", "--generation-seeds", "0")
    assert args.arms == []  # no arm shapes the sample pool
    kept = json.loads(committed.read_text())
    kept["generator_cost"]["lcont"]["peak_memory_mb"] = None  # reused from the full benchmark: not measured here
    kept["generator_cost"]["lcont"]["reused_from"] = "elsewhere"
    (args.out / "generation").mkdir(parents=True)
    (args.out / "generation" / "s0.json").write_text(json.dumps(kept))
    monkeypatch.setattr(rb, "run_or_resume", refuse_training)
    monkeypatch.setattr("diffmed.diffusion.generative.train_generator", refuse_training)
    monkeypatch.setattr(sys, "argv", sys.argv)  # main parses the fixture's argv again
    rb.main()
    md = (args.out / "generation.md").read_text()
    assert "| diffusion no L_Cont, DDIM 25 | overall |" in md
    line = next(r for r in md.splitlines() if r.startswith("| generator training, L_Cont"))
    assert "memory not measured here" in line and line.rstrip().endswith("| - |")
    assert json.loads((args.out / "generation.json").read_text())["generation"]["0"] == kept
