"""Task-aware classification losses and logit -> probability maps shared by every method.

Logit layout: ``logits[:, :C]`` score each class (softmax) or label (sigmoid). A multi-label column under
the U-MultiClass policy is a 3-way softmax over (negative = 0, positive = logits[:, j], uncertain =
logits[:, C + k]); fixing the negative logit at 0 loses nothing (softmax is shift invariant), and the
positive probability at test time is then simply sigmoid(logits[:, j]) for every column.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffmed.data.types import TaskSpec


def probabilities(logits: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """(N, num_outputs) logits -> (N, C) class or label probabilities."""
    c = spec.num_classes
    if spec.multilabel:
        return torch.sigmoid(logits[:, :c])
    return torch.softmax(logits[:, :c], dim=1)


def metric_mask(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Multi-label entries that count in metrics: unmasked and a hard 0/1 label (not U-MultiClass's 2)."""
    return ((mask > 0) & ((target == 0) | (target == 1))).astype(np.float32)


def focal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                        gamma: float) -> torch.Tensor:
    """Cross-entropy (gamma = 0) or focal loss (Lin et al.), optionally class weighted."""
    logp = F.log_softmax(logits, dim=1)
    if target.dtype.is_floating_point:  # soft targets (e.g. mixed or relabelled)
        per = -(target * logp).sum(1)
        return per.mean()
    nll = F.nll_loss(logp, target, weight=weight, reduction="none")
    if gamma > 0:
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        nll = (1 - pt) ** gamma * nll
    norm = weight[target].sum() if weight is not None else torch.tensor(float(len(target)), device=logits.device)
    return nll.sum() / norm.clamp_min(1e-8)


def multilabel_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, spec: TaskSpec,
                    pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Masked BCE over binary columns plus 3-way CE over U-MultiClass columns, averaged over counted entries."""
    c = spec.num_classes
    three = spec.three_way_columns
    bce_mask = mask.clone()
    if three:
        bce_mask[:, three] = 0
    safe_target = torch.where(bce_mask > 0, target.clamp(0, 1), torch.zeros_like(target))
    bce = F.binary_cross_entropy_with_logits(logits[:, :c], safe_target, reduction="none", pos_weight=pos_weight)
    total, count = (bce * bce_mask).sum(), bce_mask.sum()
    for k, j in enumerate(three):
        col = torch.stack([torch.zeros_like(logits[:, j]), logits[:, j], logits[:, c + k]], dim=1)
        keep = mask[:, j] > 0
        if keep.any():
            total = total + F.cross_entropy(col[keep], target[keep, j].round().long(), reduction="sum")
            count = count + keep.sum()
    return total / count.clamp_min(1.0)


def classification_loss(logits: torch.Tensor, batch: dict, spec: TaskSpec, class_weights: torch.Tensor | None = None,
                        focal_gamma: float = 0.0) -> torch.Tensor:
    if spec.multilabel:
        return multilabel_loss(logits, batch["target"], batch["mask"], spec, pos_weight=class_weights)
    return focal_cross_entropy(logits[:, : spec.num_classes], batch["target"], class_weights, focal_gamma)
