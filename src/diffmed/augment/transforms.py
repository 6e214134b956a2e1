"""Traditional augmentation (torchvision transforms v2) with the thesis's parameters as defaults.

Transforms act on one (C, H, W) float image in [0, 1], before intensity normalisation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from diffmed.errors import ConfigError

NEAREST = InterpolationMode.NEAREST
THESIS_SIZE = 256
"""Side in pixels of the thesis's images (cropped to 256 x 256), the scale of its pixel-sized parameters."""


class GaussianOrSaltPepper(v2.Transform):
    """Gaussian noise or salt-and-pepper noise, each with probability 0.5 (thesis section 4.4)."""

    def __init__(self, sigma: float = 0.1, amount: float = 0.02) -> None:
        super().__init__()
        self.sigma, self.amount = sigma, amount

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
            return inpt
        if torch.rand(()) < 0.5:
            return (inpt + torch.randn_like(inpt) * self.sigma).clamp(0, 1)
        u = torch.rand_like(inpt[:1]).expand_as(inpt)  # same pixels in every channel
        out = inpt.masked_fill(u < self.amount / 2, 0.0)
        return out.masked_fill(u > 1 - self.amount / 2, 1.0)


class RandomCropResize(v2.Transform):
    """Random crop of ``scale`` of each side, resized back so the input contract is unchanged."""

    def __init__(self, scale: float = 0.875) -> None:
        super().__init__()
        self.scale = scale

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor):
            return inpt
        h, w = inpt.shape[-2:]
        crop = v2.RandomCrop((max(1, round(h * self.scale)), max(1, round(w * self.scale))))
        return v2.functional.resize(crop(inpt), [h, w], antialias=True)


class ScaledGaussianBlur(v2.Transform):
    """The thesis's Gaussian blur (11 x 11 kernel, sigma 10 at 256 px) scaled to the image's side, so a
    28 px image gets the same relative blur (3 x 3, sigma 1.1) instead of being smeared to a blob."""

    def __init__(self, kernel: int = 11, sigma: float = 10.0, reference: int = THESIS_SIZE) -> None:
        super().__init__()
        self.kernel, self.sigma, self.reference = kernel, sigma, reference

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor):
            return inpt
        scale = min(inpt.shape[-2:]) / self.reference
        kernel = max(3, 2 * round(self.kernel * scale / 2 - 0.5) + 1)  # odd, at least 3
        return v2.functional.gaussian_blur(inpt, [kernel, kernel], [max(0.1, self.sigma * scale)] * 2)


def _flip() -> v2.Transform:
    # thesis: a vertical or a horizontal flip, each with probability 0.5
    return v2.RandomChoice([v2.RandomHorizontalFlip(1.0), v2.RandomVerticalFlip(1.0), v2.Identity()], p=[0.25, 0.25, 0.5])


TRADITIONAL: dict[str, Callable[[], v2.Transform]] = {
    "rotation": lambda: v2.RandomRotation(90, interpolation=NEAREST),
    "flipping": _flip,
    "translation": lambda: v2.RandomAffine(0, translate=(0.2, 0.2), fill=0.0),
    "shearing": lambda: v2.RandomAffine(0, shear=(0, 15), interpolation=NEAREST),
    "cropping": RandomCropResize,
    "noise": GaussianOrSaltPepper,
    "blurring": ScaledGaussianBlur,
    "coloring": lambda: v2.ColorJitter(brightness=(1.0, 2.0), contrast=(1.0, 2.0)),
}
"""The eight traditional methods of the thesis (section 4.4), by name."""

COMBINED = ("rotation", "shearing", "flipping", "noise", "blurring")
"""The thesis's final combined policy: the five methods that helped on its data (section 5)."""

POLICIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "flip": (),
    "standard": (),
    "traditional": COMBINED,
}


def build_transform(policy: str, methods: list[str] | None = None, p: float = 0.5) -> Callable | None:
    """A training transform for a named policy, or for an explicit list of traditional methods.

    ``flip`` (random horizontal flip) and ``standard`` (flip + small affine) are the light policies
    for classifier training; ``traditional`` applies each of the thesis's combined methods with
    probability ``p``. ``methods`` overrides the list (e.g. ``["rotation"]`` for one-method ablations).
    """
    if policy == "none" and not methods:
        return None
    if policy == "flip":
        return v2.RandomHorizontalFlip()
    if policy == "standard":
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(10, translate=(0.05, 0.05), scale=(0.95, 1.05))])
    if policy not in POLICIES:
        raise ConfigError(f"unknown augment.policy '{policy}'; choose one of {', '.join(POLICIES)}")
    names = list(methods) if methods else list(POLICIES[policy])
    unknown = [m for m in names if m not in TRADITIONAL]
    if unknown:
        raise ConfigError(f"unknown augmentation {unknown}; choose from {', '.join(TRADITIONAL)}")
    return v2.Compose([v2.RandomApply([TRADITIONAL[m]()], p=p) for m in names])
