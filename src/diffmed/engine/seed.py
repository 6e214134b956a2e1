"""One seed covers python, numpy, torch and data order; each epoch re-seeds from (seed, epoch) so that
a resumed run continues exactly as an uninterrupted one."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochReseed(L.Callback):
    """Re-seed global RNGs (dropout, augmentation in the main process) at every epoch start."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_all((self.seed * 1_000_003 + trainer.current_epoch * 7919 + trainer.global_rank) % 2**31)
