"""Batched inference over a loader: logits, targets and the time it took."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader


@dataclass
class Outputs:
    logits: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    index: np.ndarray
    seconds: float

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, len(self.logits))


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def collect_outputs(method, loader: DataLoader) -> Outputs:
    """Run ``method.predict_logits`` over every batch (eval mode, same device as the method)."""
    method.eval()
    device = device_of(method)
    parts: list[tuple] = []
    start = time.perf_counter()
    for batch in loader:
        logits = method.predict_logits(batch["image"].to(device))
        parts.append((logits.float().cpu(), batch["target"], batch["mask"], batch["index"]))
    seconds = time.perf_counter() - start
    logits, targets, masks, index = (torch.cat(p).numpy() for p in zip(*parts))
    return Outputs(logits, targets, masks, index, seconds)


def pick_device(accelerator: str = "auto") -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
