"""The contract every registered classifier method follows (a LightningModule).

A method gets the task contract (TaskSpec), its own validated ``Params``, the optimiser config and the
training-set class counts. It implements ``forward(images) -> logits`` and, when inference is more than
one forward pass (diffusion sampling), ``predict_logits``. Methods with stages trained before the main
fit (a prior network, a frozen generator) implement ``fit_stages``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from diffmed.config import OptimConfig
from diffmed.data.types import TaskSpec
from diffmed.methods.losses import classification_loss, metric_mask, probabilities


class BaseParams(BaseModel):
    """Options every method shares: how the loss handles class imbalance."""

    model_config = ConfigDict(extra="forbid")
    class_weighting: bool = False
    """Weight the loss by inverse class frequency (pos_weight = neg/pos per label for multi-label)."""
    focal_gamma: float = 0.0
    """> 0 turns cross-entropy into focal loss."""
    balanced_sampler: bool = False
    """Draw training batches with equal expected share per class."""

    saved_defaults: ClassVar[dict[str, Any]] = {}
    """Former defaults of options whose default changed: a saved model whose options lack one was trained and
    calibrated with this value, so it is loaded with it (``saved_method_params``)."""


@dataclass
class StageContext:
    """What a method's pre-training stages may use: the data, a trainer factory and a folder of their own."""

    datamodule: Any
    run_dir: Path
    make_trainer: Any
    """``make_trainer(stage_dir, max_epochs, monitor) -> lightning.Trainer`` with the run's engine settings."""
    resume: bool


class ClassifierMethod(L.LightningModule):
    Params: ClassVar[type[BaseParams]] = BaseParams

    def __init__(self, spec: TaskSpec, params: BaseParams, optim: OptimConfig, max_epochs: int,
                 class_counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.spec, self.params, self.optim_cfg, self.max_epochs = spec, params, optim, max_epochs
        weights = self._class_weights(class_counts) if params.class_weighting and class_counts is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []
        self.images_seen = 0
        """Training images processed by this process (for throughput; not checkpointed)."""

    def _class_weights(self, counts: np.ndarray) -> torch.Tensor:
        counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        if self.spec.multilabel:  # BCE pos_weight: negatives per positive
            return torch.tensor(counts.sum() / counts - 1.0, dtype=torch.float32).clamp_min(1.0)
        return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)

    # --- what subclasses provide -------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation and prediction (default: one forward pass)."""
        return self(images)

    def forward_passes_per_image(self) -> float:
        """Network evaluations per image at inference, for cost tables."""
        return 1.0

    def fit_stages(self, ctx: StageContext) -> None:
        """Train anything that must exist before the main fit (default: nothing)."""

    def plot_extras(self, images: torch.Tensor, targets: list[int], out_dir: Path) -> None:
        """Method-specific pictures of a few test images for the report (default: none)."""

    def frozen_submodules(self) -> list[torch.nn.Module]:
        """Submodules kept in eval mode while the rest trains (frozen priors, EMA copies)."""
        return []

    def train(self, mode: bool = True) -> "ClassifierMethod":
        super().train(mode)
        for module in self.frozen_submodules():
            module.eval()  # batch-norm statistics and dropout of frozen parts never change
        return self

    # --- shared training logic -----------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return classification_loss(logits, batch, self.spec, self.class_weights, self.params.focal_gamma)

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Loss of one training batch; methods with extra terms override this."""
        return self.loss(self(batch["image"]), batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}; "
                                     "lower optim.lr or set train.grad_clip")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        self.images_seen += len(batch["image"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.predict_logits(batch["image"])
        self._val_outputs.append((logits.float().cpu(), batch["target"].cpu(), batch["mask"].cpu()))

    def on_validation_epoch_end(self) -> None:
        from diffmed.evaluation.metrics import classification_metrics

        if not self._val_outputs:
            return
        logits, target, mask = (torch.cat(t) for t in zip(*self._val_outputs))
        self._val_outputs.clear()
        loss = classification_loss(logits, {"target": target, "mask": mask}, self.spec)
        probs = probabilities(logits, self.spec).numpy()
        m = classification_metrics(self.spec.task, target.numpy(), probs,
                                   mask=metric_mask(target.numpy(), mask.numpy()) if self.spec.multilabel else None)
        values = {"val/loss": float(loss)}
        values.update({f"val/{k}": float(m[k]) for k in ("acc", "auc", "f1_macro", "balanced_acc") if k in m})
        values = {k: (v if math.isfinite(v) else 0.0) for k, v in values.items()}
        # every rank validated the whole set, so the values agree without a gather
        self.log_dict(values, prog_bar=True, sync_dist=False, rank_zero_only=False)

    def configure_optimizers(self) -> Any:
        from diffmed.engine.optim import build_optimizer

        return build_optimizer([p for p in self.parameters() if p.requires_grad], self.optim_cfg, self.max_epochs)
