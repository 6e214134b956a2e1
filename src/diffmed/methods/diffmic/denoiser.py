"""The label-space denoising UNet of DiffMIC-v2 (Eq. 8) on an Np x Np map of noise points.

Input: the noisy label map y_t (C x Np x Np), concatenated with the guidance map M when there is one, projected
by a 1x1 convolution (f in Eq. 8). Every residual block is modulated per point (scale and shift, FiLM) by the
sum of the point's own timestep embedding (heterologous diffusion: each point has its own t) and the image
feature prior F. Output: the predicted noise, C x Np x Np.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


def timestep_map(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, Np, Np) integer timesteps -> (N, dim, Np, Np) sinusoidal embeddings, one per point."""
    emb = get_timestep_embedding(t.flatten(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.view(*t.shape, dim).permute(0, 3, 1, 2)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, channels)


def _down(x: torch.Tensor) -> torch.Tensor:
    """Average to the next coarser grid (same geometry as a 3x3, stride-2, padding-1 convolution)."""
    return F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


class FiLMBlock(nn.Module):
    """Residual 3x3-conv block whose normalised features are scaled and shifted by the embedding map."""

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Conv2d(emb_dim, 2 * cout, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        x = self.norm2(x) * (1 + scale) + shift
        return self.skip(h) + self.conv2(F.silu(x))


class LabelDenoiser(nn.Module):
    """epsilon_theta(y_t, M, F, t): a two-level conv UNet over the noise-point map."""

    def __init__(self, num_classes: int, with_prior: bool, cond_dim: int, channels: int = 64,
                 emb_dim: int = 128) -> None:
        super().__init__()
        d = channels
        self.time_dim = d
        self.project = nn.Conv2d(num_classes * (2 if with_prior else 1), d, 1)  # f(.) of Eq. 8
        self.time_mlp = nn.Sequential(nn.Conv2d(d, emb_dim, 1), nn.SiLU(), nn.Conv2d(emb_dim, emb_dim, 1))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.enc1 = FiLMBlock(d, d, emb_dim)
        self.down = nn.Conv2d(d, 2 * d, 3, stride=2, padding=1)
        self.enc2 = FiLMBlock(2 * d, 2 * d, emb_dim)
        self.mid = FiLMBlock(2 * d, 2 * d, emb_dim)
        self.dec2 = FiLMBlock(4 * d, 2 * d, emb_dim)
        self.up = nn.Conv2d(2 * d, d, 3, padding=1)
        self.dec1 = FiLMBlock(2 * d, d, emb_dim)
        self.out = nn.Sequential(_norm(d), nn.SiLU(), nn.Conv2d(d, num_classes, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, y_t: torch.Tensor, prior: torch.Tensor | None, cond: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """y_t, prior: (N, C, Np, Np); cond: (N, H) image feature prior; t: (N, Np, Np) timesteps."""
        x = y_t if prior is None else torch.cat([y_t, prior], dim=1)
        emb = self.time_mlp(timestep_map(t, self.time_dim).to(y_t.dtype)) + self.cond_mlp(cond)[:, :, None, None]
        h1 = self.enc1(self.project(x), emb)
        emb2 = _down(emb)
        h2 = self.enc2(self.down(h1), emb2)
        h = self.dec2(torch.cat([self.mid(h2, emb2), h2], dim=1), emb2)
        h = self.up(F.interpolate(h, size=h1.shape[-2:], mode="nearest"))
        return self.out(self.dec1(torch.cat([h, h1], dim=1), emb))
