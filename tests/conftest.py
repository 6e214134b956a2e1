"""Shared fixtures: small slices of the real data in ../shared/data (never copied into the repo)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
DATA = Path(os.environ.get("DIFFMED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"test data {path} missing: the tests read ../shared/data beside the repo "
                                "(or set DIFFMED_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(DATA)


def slice_npz(src: Path, dst: Path, n: dict[str, int]) -> Path:
    """A MedMNIST-format file with the first n[split] images of each split of a real file."""
    with np.load(src) as f:
        arrays = {f"{s}_{k}": f[f"{s}_{k}"][: n[s]] for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(dst, **arrays)
    return dst


@pytest.fixture(scope="session")
def tiny_pneumonia(tmp_path_factory, shared_data) -> Path:
    """96 train / 48 val / 48 test real PneumoniaMNIST images; the file name keeps the MedMNIST metadata."""
    return slice_npz(shared_data / "pneumoniamnist.npz", tmp_path_factory.mktemp("npz") / "pneumoniamnist.npz",
                     {"train": 96, "val": 48, "test": 48})


@pytest.fixture(scope="session")
def tiny_retina(tmp_path_factory, shared_data) -> Path:
    return slice_npz(shared_data / "retinamnist.npz", tmp_path_factory.mktemp("npz") / "retinamnist.npz",
                     {"train": 80, "val": 40, "test": 40})


@pytest.fixture(scope="session")
def ham_slice(tmp_path_factory, shared_data) -> Path:
    """A labels.csv of 10 real HAM10000 lesions per class (70 rows) pointing at the shared images."""
    root = shared_data / "ham10000_subset"
    table = pd.read_csv(root / "labels.csv")
    small = table.groupby("dx", group_keys=False).head(10).reset_index(drop=True)
    out = tmp_path_factory.mktemp("ham")
    small.to_csv(out / "labels.csv", index=False)
    return out / "labels.csv"


@pytest.fixture(scope="session")
def ham_root(shared_data) -> Path:
    return shared_data / "ham10000_subset" / "images"


TINY_GENERATOR = {"size": "tiny", "sample_every_n_epochs": None}
"""Generator options of the shared tiny generator: the smallest UNet, no sample grids."""


@pytest.fixture(scope="session")
def tiny_generator_run(tmp_path_factory, tiny_pneumonia) -> Path:
    """A tiny class-conditional generator run (1 epoch of 2 steps on the real tiny_pneumonia slice)."""
    from diffmed.config import load_config
    from diffmed.diffusion import train_generator

    cfg = load_config(None, [f"data.source={tiny_pneumonia}", "train.max_epochs=1", "train.batch_size=16",
                             "train.limit_train_batches=2", "train.progress=false"])
    return train_generator(cfg, tmp_path_factory.mktemp("generator") / "run", TINY_GENERATOR)


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while it executes
    spec.loader.exec_module(bench)
    return bench


def tiny_overrides(npz: Path, **extra) -> list[str]:
    """A fast config: 2 epochs, small batches, few bootstrap resamples, no progress bar."""
    base = {"data.source": str(npz), "train.max_epochs": 2, "train.batch_size": 32, "train.progress": False,
            "eval.bootstrap": 50, "method.params.backbone": "resnet18"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


KILL_PRELUDE = """
import os, signal
import lightning as L
import diffmed.engine.run as run

class KillAfterEpoch(L.Callback):
    def __init__(self, out):
        self.out = str(out)
    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == {kill_epoch} and {only!r} in self.out:  # checkpoints already written
            os.kill(os.getpid(), signal.SIGKILL)

build = run.build_trainer
def with_kill(cfg, out_dir, *a, **k):
    trainer = build(cfg, out_dir, *a, **k)
    trainer.callbacks.append(KillAfterEpoch(out_dir))
    return trainer
run.build_trainer = with_kill
"""


def run_killed(body: str, kill_epoch: int, only: str = "") -> "subprocess.CompletedProcess":
    """Run ``body`` in a fresh Python whose training is SIGKILLed after epoch ``kill_epoch``
    (only in run folders whose path contains ``only``)."""
    import subprocess
    import sys

    code = KILL_PRELUDE.format(kill_epoch=kill_epoch, only=only) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
