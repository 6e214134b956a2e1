"""Hyper-features of the frozen step-1 diffusion model (D-Cube, Jang et al., Sec. III-B step 2).

``FrozenDiffusion`` holds the trained denoising network and its noise schedule, frozen (parameters do
not require grad, always in eval mode). It gives

* ``features``: every block's (or the named blocks') output for an input and a timestep in ONE forward
  pass with hooks (``diffmed.diffusion.capture_block_outputs``), conditioned on the null class: the label
  is what we want to predict, so it must not enter the features;
* ``noise_prediction``: the network's noise prediction under a hard label or a soft class embedding,
  *not* under ``no_grad``, so a loss on it reaches the class probabilities (the cycle loss).

Inputs (Table VII): ``x0`` feeds the clean image with the timestep's embedding; ``xt`` noises it first,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. At test time ``eps`` is ONE tensor drawn once from a
seeded ``torch.Generator`` and reused for every image, and the timestep is fixed, so an image always gets
the same features (the public code draws a random timestep at test time).
"""
from __future__ import annotations

import torch
from torch import nn

from diffmed.diffusion.backbones import DenoisingBackbone, build_backbone, capture_block_outputs
from diffmed.diffusion.generative import ClassConditionalDiffusion, GenerativeParams
from diffmed.diffusion.schedule import training_scheduler
from diffmed.errors import ConfigError

INPUTS = ("x0", "xt")


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One Gaussian tensor from an explicit generator: the same on every call, machine and device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class FrozenDiffusion(nn.Module):
    """The step-1 denoiser as a frozen feature extractor and noise predictor."""

    def __init__(self, net: DenoisingBackbone, num_train_timesteps: int, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.net = net.requires_grad_(False).eval()
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)

    @classmethod
    def build(cls, params: GenerativeParams, num_classes: int, channels: int, image_size: int) -> "FrozenDiffusion":
        """An untrained network of the generator's architecture (weights are loaded afterwards)."""
        net = build_backbone(params.backbone, num_classes, channels, image_size, params.size, params.dropout)
        sched = training_scheduler(params.beta_schedule, params.prediction_type, params.num_train_timesteps)
        return cls(net, params.num_train_timesteps, sched.alphas_cumprod)

    @classmethod
    def from_generator(cls, generator: "ClassConditionalDiffusion | FrozenDiffusion") -> "FrozenDiffusion":
        """Wrap a trained ``ClassConditionalDiffusion`` (its sampling, i.e. EMA, weights)."""
        if isinstance(generator, FrozenDiffusion):
            return generator
        if not isinstance(generator, ClassConditionalDiffusion):
            raise TypeError(f"expected a ClassConditionalDiffusion, got {type(generator).__name__}")
        sched = generator.noise_scheduler
        return cls(generator.sampling_network, sched.config.num_train_timesteps, sched.alphas_cumprod)

    def train(self, mode: bool = True) -> "FrozenDiffusion":
        """Always in eval mode: the frozen model's behaviour never depends on the caller's mode."""
        return super().train(False)

    # --- structure ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def block_names(self) -> list[str]:
        return [name for name, _ in self.net.named_blocks()]

    def check_layers(self, layers: list[str], option: str = "method.params.layers") -> list[str]:
        known = self.block_names()
        unknown = [n for n in layers if n not in known]
        if unknown or not layers:
            raise ConfigError(f"{option}: unknown or empty layer list {unknown or layers}; this generator's blocks "
                              f"are {known}")
        return [n for n in known if n in layers]  # network order

    def check_timestep(self, t: int, option: str = "method.params.timestep") -> int:
        if not 0 <= t < self.num_train_timesteps:
            raise ConfigError(f"{option}={t} must be in [0, {self.num_train_timesteps}) (the generator's chain)")
        return int(t)

    def crop_side(self, side: int) -> int:
        """Rows/columns of a ``side``-px feature map that cover the image, not the backbone's zero padding."""
        return max(1, -(-side * self.net.image_size // self.net.padded_size))

    def crop(self, feature: torch.Tensor) -> torch.Tensor:
        """A (N, C, h, w) block output cut to the image area."""
        side = self.crop_side(feature.shape[-1])
        return feature[..., :side, :side]

    # --- inputs -----------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``noise`` broadcasts over the batch)."""
        t = torch.as_tensor(t, device=x0.device).long().expand(len(x0))
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise.to(x0.dtype)

    def model_input(self, x0: torch.Tensor, t: torch.Tensor | int, kind: str,
                    noise: torch.Tensor | None) -> torch.Tensor:
        """The network input of Table VII: the clean image (``x0``) or its noised version (``xt``)."""
        if kind not in INPUTS:
            raise ConfigError(f"method.params.input='{kind}' must be one of {list(INPUTS)}")
        if kind == "x0":
            return x0
        if noise is None:
            raise ValueError("input 'xt' needs a noise tensor")
        return self.add_noise(x0, t, noise)

    # --- outputs ----------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, t: torch.Tensor | int,
                 layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Block outputs (N, C, h, w) of one null-class forward pass, in network order."""
        return capture_block_outputs(self.net, x, t, None, None, layers)

    def noise_prediction(self, x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                         class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """epsilon (or v) predicted under a label or a soft class embedding; differentiable in the inputs."""
        return self.net(x_t, t, class_labels, class_embedding)

    def embed_classes(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, C) probabilities -> (N, D) probability-weighted class embedding (gradients reach probs)."""
        return self.net.embed_classes(probs)


def feature_shapes(frozen: FrozenDiffusion, layers: list[str], channels: int,
                   image_size: int) -> dict[str, tuple[int, ...]]:
    """(C, h, w) of each named block's output, from one forward pass on a blank image."""
    device = frozen.alphas_cumprod.device
    with torch.no_grad():
        feats = frozen.features(torch.zeros(1, channels, image_size, image_size, device=device), 0, layers)
    return {name: tuple(f.shape[1:]) for name, f in feats.items()}
