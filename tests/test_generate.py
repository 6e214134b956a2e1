"""Generator training through the engine, export/load, and class-targeted, resumable generation."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import diffmed.diffusion.generate as gen_mod
from diffmed.config import DataConfig, load_config
from diffmed.data.sources import load_source
from diffmed.diffusion import load_generator, request_counts, train_generator
from diffmed.diffusion.generative import ClassConditionalDiffusion
from diffmed.diffusion.generate import MANIFEST_COLUMNS, class_folders, generate, image_seed
from diffmed.errors import ConfigError, RunError

SETTINGS = {"per_class": 3, "steps": 2, "batch_size": 2, "seed": 7}


PARAMS = {"size": "tiny", "sample_every_n_epochs": 1, "sample_per_class": 2, "sample_steps": 2}


def tiny_config(npz):
    return load_config(None, [f"data.source={npz}", "train.max_epochs=2", "train.batch_size=16",
                              "train.limit_train_batches=2", "train.progress=false"])


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, tiny_pneumonia):
    """A tiny UNet generator trained through the engine for two epochs of 2 steps on real images."""
    return train_generator(tiny_config(tiny_pneumonia), tmp_path_factory.mktemp("gen") / "run", PARAMS)


def test_training_exports_ema_weights_and_sample_grids(generator_run):
    meta = json.loads((generator_run / "generator" / "model.json").read_text())
    assert meta["weights"] == "ema" and meta["params"]["size"] == "tiny"
    assert meta["spec"]["class_names"] == ["normal", "pneumonia"] and sum(meta["class_counts"].values()) == 96
    assert all((generator_run / "logs" / "samples" / f"epoch_000{e}.png").is_file() for e in (1, 2))
    # the exported weights are the EMA copy of the last checkpoint, not the raw trained weights
    state = torch.load(generator_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = load_file(generator_run / "generator" / "model.safetensors")
    key = "unet.conv_in.weight"
    assert torch.equal(exported[key], state[f"ema_backbone.{key}"])
    assert not torch.equal(exported[key], state[f"backbone.{key}"])
    model = load_generator(generator_run)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.backbone.unet.conv_in.weight, exported[key])
    with pytest.raises(RunError, match="has no trained generator"):
        load_generator(generator_run / "checkpoints")


def test_killed_training_resumes_to_the_same_weights(generator_run, tiny_pneumonia, tmp_path, monkeypatch):
    def killed(self):
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(ClassConditionalDiffusion, "on_train_epoch_start", killed, raising=False)
    with pytest.raises(RuntimeError, match="killed"):
        train_generator(tiny_config(tiny_pneumonia), tmp_path / "run", PARAMS)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "generator").exists()
    assert train_generator(None, tmp_path / "run", None, resume=True) == tmp_path / "run"
    resumed = load_file(tmp_path / "run" / "generator" / "model.safetensors")
    uninterrupted = load_file(generator_run / "generator" / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # EMA, optimiser, RNG resumed
    with pytest.raises(RunError, match="already holds a run"):
        train_generator(load_config(None, []), generator_run, {})


def test_a_trainer_level_ema_is_not_stacked_on_the_generator_ema(tmp_path):
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    from diffmed.diffusion.generative import without_weight_averaging
    from diffmed.engine.trainer import build_trainer

    trainer = build_trainer(load_config(None, ["train.ema_decay=0.99", "train.progress=false"]).train, tmp_path)
    assert any(isinstance(c, WeightAveraging) for c in trainer.callbacks)
    assert not any(isinstance(c, WeightAveraging) for c in without_weight_averaging(trainer).callbacks)


def test_generation_resumes_after_a_kill_with_identical_files(generator_run, tmp_path, monkeypatch):
    reference = generate(generator_run, tmp_path / "ref", **SETTINGS)
    assert reference.written == 6 and reference.images_per_second > 0

    real_write, writes = gen_mod.atomic_write_bytes, []

    def dying_write(path, data):
        if path.suffix == ".png" and len(writes) == 2:
            raise KeyboardInterrupt  # killed while writing the third image
        writes.append(path)
        real_write(path, data)

    monkeypatch.setattr(gen_mod, "atomic_write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate(generator_run, tmp_path / "out", **SETTINGS)
    monkeypatch.setattr(gen_mod, "atomic_write_bytes", real_write)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").rglob("*.png")}
    assert len(first) == 2
    (tmp_path / "out" / "images" / "normal" / ".000002.png.half").write_bytes(b"\x89PNG")  # a half-written file

    sampled = []
    real_sample = gen_mod.sample
    monkeypatch.setattr(gen_mod, "sample", lambda m, labels, **kw: (sampled.append(len(labels)),
                                                                   real_sample(m, labels, **kw))[1])
    resumed = generate(generator_run, tmp_path / "out", **SETTINGS)
    assert (resumed.written, resumed.kept, sum(sampled)) == (4, 2, 4)  # nothing already written is redone
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    ref_files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref" / "images").rglob("*"))
    out_files = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out" / "images").rglob("*"))
    assert ref_files == out_files
    for rel in ref_files:
        if rel.suffix == ".png":
            assert (tmp_path / "ref" / rel).read_bytes() == (tmp_path / "out" / rel).read_bytes(), rel
    assert (tmp_path / "ref" / "manifest.csv").read_text() == (tmp_path / "out" / "manifest.csv").read_text()
    with pytest.raises(RunError, match="other settings"):
        generate(generator_run, tmp_path / "out", **{**SETTINGS, "seed": 8})


def test_manifest_is_a_csv_data_source(generator_run, tmp_path):
    result = generate(generator_run, tmp_path / "syn", counts={"normal": 2, "pneumonia": 1}, steps=2, batch_size=4,
                      guidance=2.0, sampler="dpm")
    table = pd.read_csv(result.manifest)
    assert tuple(table.columns) == MANIFEST_COLUMNS
    assert table["label"].tolist() == ["normal", "normal", "pneumonia"] and (table["synthetic"] == 1).all()
    assert table["seed"].tolist() == [image_seed(0, 0, 0), image_seed(0, 0, 1), image_seed(0, 1, 0)]
    ds = load_source(DataConfig(source=str(result.manifest), class_names=["normal", "pneumonia"]))
    assert ds.images.shape == (3, 28, 28, 1) and ds.targets.tolist() == [0, 0, 1]


@pytest.mark.slow
def test_a_run_records_its_real_and_synthetic_training_images(generator_run, tiny_pneumonia, tmp_path):
    from conftest import tiny_overrides
    from diffmed.engine.run import train

    result = generate(generator_run, tmp_path / "syn", counts={"normal": 2, "pneumonia": 1}, steps=2, batch_size=4)
    cfg = load_config(None, tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 1,
                                                              "data.synthetic": f"[{result.manifest}]"}))
    counts = json.loads((train(cfg, tmp_path / "run") / "model" / "model.json").read_text())["train_counts"]
    assert counts["synthetic"] == {"normal": 2, "pneumonia": 1}
    assert sum(counts["real"].values()) == 96 and min(counts["real"].values()) > 0  # the slice's training split


def test_request_counts():
    names, train = ["normal", "pneumonia"], {"normal": 7, "pneumonia": 25}
    assert request_counts(names, train, balance_to=1.0) == {"normal": 18, "pneumonia": 0}
    assert request_counts(names, train, balance_to=0.5) == {"normal": 6, "pneumonia": 0}
    assert request_counts(names, train, per_class=4) == {"normal": 4, "pneumonia": 4}
    assert request_counts(names, train, counts={"pneumonia": 2}) == {"normal": 0, "pneumonia": 2}
    for bad in ({}, {"per_class": 1, "balance_to": 1.0}, {"counts": {"covid": 3}}, {"balance_to": -1.0}):
        with pytest.raises(ConfigError):
            request_counts(names, train, **bad)
    assert class_folders(["a/b", "a b", ""]) == ["a_b", "a_b_1", "class2"]


def test_cli_generate(generator_run, tmp_path):
    from diffmed.cli import friendly
    from diffmed.cli_generate import generate_cmd

    app = typer.Typer()
    app.command("generate")(friendly(generate_cmd))
    app.command("other")(lambda: None)  # a multi-command app, as in cli.py
    out = tmp_path / "cli"
    ok = CliRunner().invoke(app, ["generate", str(generator_run), "--out", str(out), "--count", "pneumonia=2",
                                  "--steps", "2"])
    assert ok.exit_code == 0, ok.output
    assert len(pd.read_csv(out / "manifest.csv")) == 2
    bad = CliRunner().invoke(app, ["generate", str(generator_run), "--per-class", "1", "--balance-to", "1"])
    assert bad.exit_code == 2 and "exactly one" in bad.output
