"""The Lightning Trainer built from the config: checkpoints, early stopping, EMA, loggers, precision, DDP."""
from __future__ import annotations

import csv
import time

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from diffmed.config import TrainConfig
from diffmed.engine.checkpoint import AtomicCheckpointIO
from diffmed.engine.seed import EpochReseed

CKPT_DIR = "checkpoints"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must append to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrainingClock(L.Callback):
    """Wall-clock seconds and images of a fit, kept in its checkpoints: a resumed run's cost covers every
    segment up to the checkpoint it resumed from, not only the time since the last resume."""

    def __init__(self) -> None:
        self._seconds_before, self._images_before = 0.0, 0
        self._start: float | None = None
        self._module: L.LightningModule | None = None
        self._images_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._module = time.perf_counter(), pl_module
        self._images_at_start = getattr(pl_module, "images_seen", 0)

    @property
    def seconds(self) -> float:
        return self._seconds_before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    @property
    def images(self) -> int:
        now = getattr(self._module, "images_seen", 0) if self._module is not None else self._images_at_start
        return self._images_before + now - self._images_at_start

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self._seconds_before, self._images_before = float(state_dict["seconds"]), int(state_dict["images"])


def training_clock(trainer: L.Trainer) -> TrainingClock:
    return next(c for c in trainer.callbacks if isinstance(c, TrainingClock))


def resolve_precision(requested: str) -> str:
    """``auto``: bf16 mixed precision where the GPU supports it, full precision elsewhere (CPU)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _strategy(cfg: TrainConfig):
    if cfg.strategy in ("ddp", "ddp_spawn") and not torch.cuda.is_available():
        from lightning.pytorch.strategies import DDPStrategy

        # gloo is the backend that runs on CPU; launch mode follows the requested strategy name
        return DDPStrategy(process_group_backend="gloo", start_method="spawn" if cfg.strategy == "ddp_spawn" else "popen")
    return cfg.strategy


def build_trainer(cfg: TrainConfig, out_dir: Path, max_epochs: int | None = None, monitor: str | None = None,
                  mode: str | None = None, ema_decay: float | None = -1.0) -> L.Trainer:
    """A Trainer writing ``last``/``best`` checkpoints and CSV/TensorBoard logs under ``out_dir``.

    ``best`` is chosen on a validation metric (``monitor``); test data never reaches the Trainer.
    """
    monitor, mode = monitor or cfg.monitor, mode or cfg.monitor_mode
    ema = cfg.ema_decay if ema_decay == -1.0 else ema_decay
    callbacks: list[L.Callback] = [
        # not save_weights_only: Lightning then skips the callbacks' on_save_checkpoint, and EMA's puts the
        # averaged weights into state_dict, so best would hold the raw ones
        ModelCheckpoint(dirpath=out_dir / CKPT_DIR, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        # its own callback: Lightning's save_last only writes when "best" improved, so an epoch without
        # improvement left last.ckpt stale and a resume after a kill silently redid those epochs
        ModelCheckpoint(dirpath=out_dir / CKPT_DIR, filename="last", monitor=None, save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        EpochReseed(cfg.seed),
        TrainingClock(),
    ]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience))
    if ema:
        callbacks.append(EMAWeightAveraging(decay=ema))
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=False))
    loggers = [ResumableCSVLogger(out_dir, name="logs", version=""), TensorBoardLogger(out_dir, name="logs", version="tb")]
    return L.Trainer(
        max_epochs=max_epochs or cfg.max_epochs, accelerator=cfg.accelerator, devices=cfg.devices,
        num_nodes=cfg.num_nodes, strategy=_strategy(cfg), precision=resolve_precision(cfg.precision),
        gradient_clip_val=cfg.grad_clip, callbacks=callbacks, logger=loggers,
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, deterministic=cfg.deterministic,
        enable_progress_bar=cfg.progress, enable_model_summary=False, log_every_n_steps=10,
        limit_train_batches=cfg.limit_train_batches, num_sanity_val_steps=0,
    )
