"""Dual-granularity Conditional Guidance (DiffMIC-v2, Sec. III-C-1, Eqs. 2-3): global and local priors.

The global encoder's feature map goes through a 1x1 convolution to a C-channel saliency map whose spatial
mean gives the global logits (prior y_g = softmax or sigmoid of them). The K most salient positions of that
map pick K fixed-size crops of the image (all channels, one batched gather), a local encoder embeds each
crop and gated attention (Eq. 2-3) pools the K embeddings into the local logits (prior y_l).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffmed.models import create_backbone


def feature_map(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) spatial features of a timm CNN, or of a ViT (patch tokens laid back on their grid)."""
    feats = net.forward_features(images)
    if feats.ndim == 4:
        return feats
    tokens = feats[:, getattr(net, "num_prefix_tokens", 0):]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(len(feats), -1, side, tokens.shape[1] // side)


def crop_windows(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``size`` x ``size`` windows with top-left corners ``boxes`` (N, K, 2) as (y, x), all channels.

    One advanced-indexing gather over the whole batch: returns (N, K, C, size, size).
    """
    n = len(images)
    offsets = torch.arange(size, device=images.device)
    rows = (boxes[..., 0:1] + offsets)[..., :, None]  # (N, K, size, 1)
    cols = (boxes[..., 1:2] + offsets)[..., None, :]  # (N, K, 1, size)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    return images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # (N, K, size, size, C) -> (N, K, C, size, size)


def top_k_boxes(scores: torch.Tensor, k: int, image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Top-left corners (N, K, 2) of windows centred on the ``k`` highest cells of ``scores`` (N, h, w).

    Each cell is mapped to its centre in image pixels; windows are shifted inside the image (as in GMIC).
    """
    n, h, w = scores.shape
    idx = scores.flatten(1).topk(k, dim=1).indices  # (N, K), distinct cells
    cell = torch.stack([idx // w, idx % w], dim=-1).float()  # (N, K, 2) as (row, col)
    scale = torch.tensor([image_hw[0] / h, image_hw[1] / w], device=scores.device)
    centre = (cell + 0.5) * scale
    high = torch.tensor([image_hw[0] - size, image_hw[1] - size], device=scores.device)
    return torch.minimum(torch.floor(centre - size / 2).clamp_min(0), high).long()


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al.; the paper's Eq. 2-3): z = sum_k alpha_k r_k."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.V, self.U, self.w = nn.Linear(in_dim, hidden), nn.Linear(in_dim, hidden), nn.Linear(hidden, 1)

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K, M) instance features -> pooled (N, M) and attention weights (N, K)."""
        alpha = self.w(torch.tanh(self.V(r)) * torch.sigmoid(self.U(r))).squeeze(-1).softmax(dim=1)
        return (alpha.unsqueeze(-1) * r).sum(1), alpha


@dataclass
class DCGOutput:
    global_logits: torch.Tensor
    """(N, C) spatial mean of the saliency map."""
    local_logits: torch.Tensor | None
    """(N, C) from the attention-pooled ROI features; None when the local stream was not asked for."""
    rois: torch.Tensor | None
    """(N, K, channels, roi, roi) image crops; None when not asked for."""
    boxes: torch.Tensor | None
    """(N, K, 2) top-left (y, x) of each crop."""
    global_features: torch.Tensor | None = None
    """(N, D) spatial mean of the global encoder's feature map."""
    roi_features: torch.Tensor | None = None
    """(N, K, M) local encoder embedding of each crop; None when the local stream was not asked for."""


class DCG(nn.Module):
    """The DCG model tau_D: global encoder + saliency, top-K ROI crops, local encoder + gated attention."""

    def __init__(self, channels: int, num_classes: int, image_size: int, multilabel: bool, global_backbone: str,
                 local_backbone: str, num_rois: int, roi_size: int, attention_dim: int,
                 global_weights: bool | str = False, local_weights: bool | str = False) -> None:
        super().__init__()
        self.num_rois, self.roi_size, self.multilabel = num_rois, roi_size, multilabel
        self.global_encoder = create_backbone(global_backbone, channels, 0, image_size, pretrained=global_weights)
        self.saliency = nn.Conv2d(self.global_encoder.num_features, num_classes, 1)
        self.local_encoder = create_backbone(local_backbone, channels, 0, roi_size, pretrained=local_weights)
        dim = self.local_encoder.num_features
        self.attention = GatedAttention(dim, attention_dim)
        self.local_head = nn.Linear(dim, num_classes)

    def saliency_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, channels, H, W) images -> (N, C, h, w) class response map of the global stream."""
        return self.saliency(feature_map(self.global_encoder, images))

    def roi_embeddings(self, rois: torch.Tensor) -> torch.Tensor:
        """(N, K, channels, roi, roi) crops -> (N, K, M) local encoder features, the K crops in one batch."""
        n, k = rois.shape[:2]
        return self.local_encoder(rois.flatten(0, 1)).view(n, k, -1)

    def roi_scores(self, saliency: torch.Tensor) -> torch.Tensor:
        """(N, h, w) where to look: the predicted class's map (single-label), the strongest label (multi-label)."""
        if self.multilabel:
            return saliency.amax(1)
        top = saliency.mean((2, 3)).argmax(1)
        return saliency[torch.arange(len(saliency), device=saliency.device), top]

    def crop(self, images: torch.Tensor, saliency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = top_k_boxes(self.roi_scores(saliency.detach()), self.num_rois, images.shape[-2:], self.roi_size)
        return crop_windows(images, boxes, self.roi_size), boxes

    def local_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, K, M) crop embeddings -> (N, C) logits of the attention-pooled crops."""
        z, _ = self.attention(embeddings)
        return self.local_head(z)

    def forward(self, images: torch.Tensor, local: bool = True, rois: bool = True) -> DCGOutput:
        """Global logits and features always; the crops when ``rois`` or ``local``; the crops' embeddings and
        the local logits when ``local``."""
        fmap = feature_map(self.global_encoder, images)
        saliency = self.saliency(fmap)
        out = DCGOutput(saliency.mean((2, 3)), None, None, None, global_features=fmap.mean((2, 3)))
        if local or rois:
            out.rois, out.boxes = self.crop(images, saliency)
        if local:
            out.roi_features = self.roi_embeddings(out.rois)
            out.local_logits = self.local_logits(out.roi_features)
        return out
