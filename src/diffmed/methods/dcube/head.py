"""The D-Cube classifier head (Sec. III-B.2.c) on the selected hyper-features.

1. The selected block outputs are cropped to the image area (the backbone's zero padding removed),
   resized to a common ``size`` x ``size`` grid, concatenated, standardised per channel (BatchNorm) and
   reduced by a 1x1 convolution to the diffusion feature map ``m``: a single channel in the paper,
   ``diffusion_channels`` here (default 1).
2. Sub-features (optional): a timm CNN (fine-tuned with the head) gives ``f_sub``, projected to
   ``sub_channels`` (the paper: 3) maps; ``f_sub`` and ``m`` are concatenated and global-sum-pooled into
   one score per sub-channel, and ``m`` is multiplied by the scores: each channel of ``m`` is expanded into
   ``sub_channels`` channels weighted by what the CNN finds important. Without sub-features ``m`` goes on
   as it is.
3. Three stages of parallel 3x3 and 5x5 convolutions (BatchNorm, ReLU), no pooling, the width
   shrinking stage by stage, then two fully connected layers give the logits.
4. Pooled features (optional, not in the paper): the standardised spatial means of the selected blocks
   join the first fully connected layer's input. The 1x1 reduction to ``m`` keeps one number per pixel,
   so what tells classes apart across channels is lost; on HAM10000 a linear probe on these means beats
   the paper's head by far (``benchmarks/dcube_probe.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffmed.models import create_backbone


def resize_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_in, n_out) weights of 1-D linear resizing (anti-aliased when shrinking), as a matrix."""
    # a width of 2 (not 1): PyTorch's anti-aliased kernel mishandles a singleton dimension
    eye = torch.eye(n_in, device=device, dtype=torch.float32).view(n_in, 1, n_in, 1).expand(-1, -1, -1, 2)
    rows = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=n_out < n_in)
    return rows[..., 0].reshape(n_in, n_out).to(dtype)


def resize_map(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` (anti-aliased when shrinking).

    Written as two small matrix products: their backward is deterministic on CUDA, which
    ``F.interpolate``'s bilinear backward is not (the engine trains with deterministic algorithms).
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    a_h = resize_weights(h, size, x.device, x.dtype)
    a_w = resize_weights(w, size, x.device, x.dtype)
    return torch.einsum("nchw,hH,wW->ncHW", x, a_h, a_w)


class MultiKernelBlock(nn.Module):
    """Parallel 3x3 and 5x5 convolutions, concatenated, BatchNorm, ReLU (spatial size kept)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv3 = nn.Conv2d(in_channels, half, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(in_channels, out_channels - half, 5, padding=2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(torch.cat([self.conv3(x), self.conv5(x)], dim=1)))


class SubFeatures(nn.Module):
    """A timm CNN's last feature map projected to ``channels`` maps (the paper's f_sub)."""

    def __init__(self, backbone: str, in_chans: int, image_size: int, channels: int,
                 pretrained: bool | str = False) -> None:
        super().__init__()
        self.cnn = create_backbone(backbone, in_chans, 0, image_size, pretrained=pretrained)
        with torch.no_grad():
            was = self.cnn.training
            width = self.cnn.eval().forward_features(torch.zeros(1, in_chans, image_size, image_size)).shape[1]
            self.cnn.train(was)
        self.proj = nn.Conv2d(width, channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.cnn.forward_features(images)
        if fmap.ndim != 4:
            raise ValueError(f"sub-feature backbone must give a (N, C, h, w) feature map, got {tuple(fmap.shape)}; "
                             "use a CNN (ResNet, ResNeXt, DenseNet, ...)")
        return self.proj(fmap)


class DCubeHead(nn.Module):
    """Hyper-feature maps (+ the image, for sub-features) -> logits."""

    def __init__(self, in_channels: list[int], size: int, num_outputs: int, sub: SubFeatures | None = None,
                 sub_channels: int = 3, width: int = 64, hidden: int = 256, dropout: float = 0.0,
                 diffusion_channels: int = 1, pooled: bool = False) -> None:
        super().__init__()
        self.size = size
        self.norm = nn.BatchNorm2d(sum(in_channels))
        self.pooled_norm = nn.BatchNorm1d(sum(in_channels)) if pooled else None
        self.reduce = nn.Conv2d(sum(in_channels), diffusion_channels, 1)
        self.sub = sub
        self.score = nn.Conv2d(sub_channels + diffusion_channels, sub_channels, 1) if sub is not None else None
        widths = [max(4, width >> i) for i in range(3)]
        chans = [diffusion_channels * (sub_channels if sub is not None else 1), *widths]
        self.convs = nn.Sequential(*(MultiKernelBlock(chans[i], chans[i + 1]) for i in range(3)))
        fc_in = widths[-1] * size * size + (sum(in_channels) if pooled else 0)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(fc_in, hidden), nn.ReLU(inplace=True),
                                nn.Dropout(dropout), nn.Linear(hidden, num_outputs))

    def diffusion_map(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The diffusion feature m, (N, diffusion_channels, size, size)."""
        x = torch.cat([resize_map(m.float(), self.size) for m in maps], dim=1)
        return self.reduce(self.norm(x))

    def expand(self, m: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Each channel of m times every sub-feature score: (N, diffusion_channels * sub_channels, size, size)."""
        f_sub = resize_map(self.sub(images).float(), self.size)
        scores = self.score(torch.cat([f_sub, m], dim=1)).sum(dim=(2, 3))  # global sum pooling
        return (m[:, :, None] * scores[:, None, :, None, None]).flatten(1, 2)

    def forward(self, maps: list[torch.Tensor], images: torch.Tensor | None = None) -> torch.Tensor:
        m = self.diffusion_map(maps)
        if self.sub is not None:
            if images is None:
                raise ValueError("this head uses sub-features: pass the images")
            m = self.expand(m, images)
        z = self.convs(m).flatten(1)
        if self.pooled_norm is not None:
            z = torch.cat([z, self.pooled_norm(torch.cat([f.float().mean(dim=(-2, -1)) for f in maps], dim=1))], 1)
        return self.fc(z)
