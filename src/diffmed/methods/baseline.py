"""The strong baseline: any timm backbone trained end to end with the task's loss."""
from __future__ import annotations

import torch

from diffmed.methods.base import BaseParams, ClassifierMethod
from diffmed.methods.registry import METHODS
from diffmed.models import create_backbone


class BaselineParams(BaseParams):
    backbone: str = "resnet18"
    small_stem: bool | None = None
    """CIFAR-style stem (3x3 conv, no max-pool); default: on for images of 64 px or less."""
    pretrained: bool | str = False
    """False (from scratch), True (hub weights, needs network) or a local weights file."""
    drop_rate: float = 0.0


@METHODS.register("baseline")
class Baseline(ClassifierMethod):
    Params = BaselineParams

    def __init__(self, spec, params: BaselineParams, optim, max_epochs, class_counts=None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        self.net = create_backbone(params.backbone, spec.channels, spec.num_outputs, spec.image_size,
                                   params.small_stem, params.pretrained, params.drop_rate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (for PCA of the misclassified-augmentation strategy, probes)."""
        return self.net.forward_head(self.net.forward_features(images), pre_logits=True)
