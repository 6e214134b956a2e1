"""SimCLR (Chen et al. 2020): the contrastive self-supervised baseline of Table 4, in the same harness.

``fit_stages`` pre-trains a timm encoder with the NT-Xent loss on two augmented views of every
unlabelled image (torchvision v2: resized crop, flip, brightness/contrast jitter, blur; no hue or
colour-drop, which mean little for grey medical images), the main fit then trains a linear probe
(or fine-tunes everything, ``finetune=true``) on the labelled images.

Written here (about 60 lines) rather than taken from ``lightly``: that package would add hydra-core,
omegaconf and antlr to diffmed's dependencies for one loss function and a transform list.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import v2

from diffmed.diffusion.pretrain import unlabelled_loader
from diffmed.errors import ConfigError
from diffmed.methods.base import BaseParams, ClassifierMethod, StageContext
from diffmed.methods.diffusion_classifier import probe_head
from diffmed.methods.registry import METHODS
from diffmed.models import create_backbone

STAGE, META, WEIGHTS = "simclr", "simclr.json", "encoder.safetensors"


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross-entropy: each view must pick its partner among the 2N - 1 others."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def simclr_augment(image_size: int, crop_scale: float = 0.5) -> v2.Transform:
    """One random view of a (C, H, W) image in [0, 1]."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
    ])


class SimCLRParams(BaseParams):
    backbone: str = "resnet18"
    small_stem: bool | None = None
    proj_dim: int = 128
    temperature: float = 0.5
    crop_scale: float = 0.5
    pretrain_epochs: int = 50
    pretrain_lr: float = 1e-3
    finetune: bool = False
    """Train the encoder with the head (default: linear probe on frozen features)."""
    pretrained_run: str | None = None
    """A run or `diffmed pretrain` folder whose SimCLR encoder to use instead of pre-training here."""


class SimCLRPretrainer(L.LightningModule):
    """Encoder + 2-layer projection head trained with NT-Xent on pairs of views (labels unused)."""

    def __init__(self, encoder: nn.Module, spec, params: SimCLRParams) -> None:
        super().__init__()
        dim = encoder.num_features
        self.encoder, self.params = encoder, params
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, params.proj_dim))
        self.augment = simclr_augment(spec.image_size, params.crop_scale)
        self.register_buffer("mean", torch.tensor(spec.mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(-1, 1, 1), persistent=False)

    def views(self, x: torch.Tensor) -> torch.Tensor:
        raw = (x * self.std + self.mean).clamp(0, 1)
        return (torch.stack([self.augment(img) for img in raw]) - self.mean) / self.std

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        z1, z2 = (self.projector(self.encoder(self.views(x))) for _ in range(2))
        loss = nt_xent(z1, z2, self.params.temperature)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.params.pretrain_lr, weight_decay=1e-6)


def _encoder_folder(path: str | Path) -> Path:
    path = Path(path)
    for folder in (path, path / "model", path / "stages" / STAGE / "model"):
        if (folder / META).is_file():
            return folder
    raise ConfigError(f"method.params.pretrained_run '{path}' holds no SimCLR encoder ({META} not found)")


@METHODS.register("simclr")
class SimCLR(ClassifierMethod):
    Params = SimCLRParams

    def __init__(self, spec, params: SimCLRParams, optim, max_epochs, class_counts=None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        self.encoder = create_backbone(params.backbone, spec.channels, 0, spec.image_size, params.small_stem)
        self.head = probe_head(self.encoder.num_features, spec.num_outputs)
        self.encoder.requires_grad_(params.finetune)

    def fit_stages(self, ctx: StageContext) -> None:
        stage = Path(ctx.run_dir) / "stages" / STAGE
        source = self.params.pretrained_run or (stage if (stage / "model" / META).is_file() else None)
        if source is None:
            self._pretrain(ctx, stage)
        else:
            folder = _encoder_folder(source)
            meta = json.loads((folder / META).read_text())
            if meta["backbone"] != self.params.backbone:
                raise ConfigError(f"'{source}' pre-trained backbone '{meta['backbone']}', this run asks for "
                                  f"'{self.params.backbone}'; set method.params.backbone={meta['backbone']}")
            self.encoder.load_state_dict(load_file(str(folder / WEIGHTS)))
        self.encoder.requires_grad_(self.params.finetune)

    def _pretrain(self, ctx: StageContext, stage: Path) -> None:
        from diffmed.engine.trainer import CKPT_DIR

        self.encoder.requires_grad_(True)
        module = SimCLRPretrainer(self.encoder, self.spec, self.params)
        trainer = ctx.make_trainer(stage, self.params.pretrain_epochs, "train/loss", "min")
        last = stage / CKPT_DIR / "last.ckpt"
        trainer.fit(module, train_dataloaders=unlabelled_loader(ctx.datamodule),
                    ckpt_path=last if ctx.resume and last.is_file() else None, weights_only=True)
        self.encoder.cpu()
        if trainer.is_global_zero:
            folder = stage / "model"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()}, str(folder / WEIGHTS))
            (folder / META).write_text(json.dumps({"backbone": self.params.backbone,
                                                   "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}))
        trainer.strategy.barrier()

    def train(self, mode: bool = True) -> "SimCLR":
        """A frozen encoder stays in eval mode (its BatchNorm statistics are part of the probe's input)."""
        super().train(mode)
        if not self.params.finetune:
            self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.params.finetune and torch.is_grad_enabled()):
            feats = self.encoder(images)
        return self.head(feats)
