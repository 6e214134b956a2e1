"""The training engine on real data slices: resume after SIGKILL, CPU DDP, safe loading, run folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_killed, tiny_overrides
from diffmed.config import load_config
from diffmed.engine.run import load_trained, train
from diffmed.errors import RunError

def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_pneumonia):
    overrides = tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 3, "augment.policy": "standard",
                                                   "method.params.drop_rate": 0.2})
    straight = train(load_config(None, overrides), tmp_path / "straight")

    killed = tmp_path / "killed"
    body = f"from diffmed.config import load_config\nrun.train(load_config(None, overrides={overrides!r}), {str(killed)!r})"
    proc = run_killed(body, kill_epoch=1)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "metrics.json").exists()

    train(None, killed, resume=True)
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ma, mb = (json.loads((d / "metrics.json").read_text())["test"] for d in (straight, killed))
    assert ma["auc"] == mb["auc"] and ma["acc"] == mb["acc"]
    # the cost counts every segment: the images trained on before the kill are not forgotten
    images = [c["train_images_per_second"] * c["train_seconds"]
              for c in (json.loads((d / "metrics.json").read_text())["cost"] for d in (straight, killed))]
    assert images[1] == pytest.approx(images[0], rel=1e-6)
    logged = pd.read_csv(killed / "logs" / "metrics.csv").dropna(subset=["val/auc"])
    assert sorted(logged["epoch"].unique()) == [0, 1, 2]  # the log before the kill is kept


@pytest.mark.slow
def test_two_process_cpu_ddp(tmp_path, tiny_pneumonia):
    run_dir = tmp_path / "ddp"
    args = [sys.executable, "-m", "diffmed.cli", "train", "--out", str(run_dir), "--devices", "2",
            "--strategy", "ddp"] + sum((["-s", o] for o in tiny_overrides(tiny_pneumonia, **{
                "train.accelerator": "cpu", "train.max_epochs": 1})), [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 96 training images, batch 32: one process takes 3 steps an epoch, each of two ranks takes 2
    assert ckpt["global_step"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["n_test"] == 48


def test_new_run_never_overwrites_and_resume_needs_a_run(tmp_path, tiny_pneumonia):
    cfg = load_config(None, tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 1}))
    run_dir = train(cfg, tmp_path / "run")
    with pytest.raises(RunError, match="already holds a run"):
        train(cfg, run_dir)
    with pytest.raises(RunError, match="cannot resume"):
        train(None, tmp_path / "nothing", resume=True)
    saved = (run_dir / "config.yaml").read_text()
    assert "max_epochs: 1" in saved and str(tiny_pneumonia) in saved


def test_trained_model_loads_from_safetensors_and_predicts_the_same(tmp_path, tiny_pneumonia):
    run_dir = train(load_config(None, tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 1})), tmp_path / "r")
    method, meta, _ = load_trained(run_dir)
    assert meta["channels"] == 1 and meta["image_size"] == 28 and meta["class_names"] == ["normal", "pneumonia"]
    assert meta["params"]["backbone"] == "resnet18" and meta["temperature"] > 0
    x = torch.randn(4, 1, 28, 28)
    again, _, _ = load_trained(run_dir)
    torch.testing.assert_close(method.predict_logits(x), again.predict_logits(x))


def test_a_model_started_from_a_local_weights_file_loads_after_the_file_is_gone(tmp_path, tiny_pneumonia):
    from safetensors.torch import save_file

    from diffmed.models import create_backbone

    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("resnet18", 1, 0, 28).state_dict().items()}, str(weights))
    run_dir = train(load_config(None, tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 1,
                                                                        "method.params.pretrained": str(weights)})),
                    tmp_path / "r")
    x = torch.randn(2, 1, 28, 28)
    before = load_trained(run_dir)[0].predict_logits(x)
    weights.unlink()  # e.g. the model is used on another machine
    method, meta, _ = load_trained(run_dir)
    assert meta["params"]["pretrained"] == str(weights)
    torch.testing.assert_close(method.predict_logits(x), before)


def test_checkpoints_refuse_pickled_code(tmp_path):
    """Resume checkpoints are read with weights_only=True: an object that runs code on load is refused."""
    from diffmed.engine.checkpoint import AtomicCheckpointIO

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_atomic_checkpoint_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    from diffmed.engine import checkpoint

    target = tmp_path / "last.ckpt"
    checkpoint.AtomicCheckpointIO().save_checkpoint({"a": torch.ones(2)}, target)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.AtomicCheckpointIO().save_checkpoint({"a": torch.zeros(2)}, target)
    torch.testing.assert_close(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tmp_path):
    """Lightning's save_last skips epochs where "best" did not improve; a resume would redo them."""
    import lightning as L

    from diffmed.config import TrainConfig
    from diffmed.engine.trainer import build_trainer

    class Flat(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            return (self.w - batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val/auc", 0.5)  # never improves after epoch 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    cfg = TrainConfig(max_epochs=3, progress=False, accelerator="cpu")
    build_trainer(cfg, tmp_path, monitor="val/auc", mode="max").fit(Flat(), loader, loader)
    ckpt = lambda name: torch.load(tmp_path / "checkpoints" / f"{name}.ckpt", weights_only=True)  # noqa: E731
    assert ckpt("best")["epoch"] == 0
    assert ckpt("last")["epoch"] == 2 and ckpt("last")["global_step"] == 6


def test_stage_seconds_add_up_over_the_processes_of_a_run(tmp_path):
    from diffmed.engine.run import _add_stage_seconds

    assert _add_stage_seconds(tmp_path, 3.0) == 3.0 and not (tmp_path / "stages").exists()  # no stages: nothing kept
    (tmp_path / "stages").mkdir()
    assert _add_stage_seconds(tmp_path, 100.0) == 100.0  # the process that trained the stages
    assert _add_stage_seconds(tmp_path, 0.5) == 100.5  # a resumed one that only reloaded them
    assert json.loads((tmp_path / "stages" / "seconds.json").read_text()) == {"seconds": 100.5}
