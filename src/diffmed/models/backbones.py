"""timm backbones by name, with a CIFAR-style stem for 28-64 px images and optional pretrained weights.

The small stem keeps the first stage at no more than 32 x 32, the scale CIFAR ResNets were designed for:
stride 1 up to 32 px, stride 2 from 33 to 64 px (no max-pool in either). A stride-1 stem at 64 px would make
ResNet-18 about 14x slower than timm's stem (125 vs 8.9 ms per image, one CPU thread); stride 2 costs 4x.

Pretrained weights are never required: ``pretrained`` is False (train from scratch), True (timm's hub
weights for the name, needs network access) or a local ``.safetensors``/``.pth`` file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from diffmed.errors import ConfigError

log = logging.getLogger("diffmed.models")


def _conv_like(old: nn.Conv2d, in_chans: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, old.out_channels, kernel, stride, kernel // 2, bias=old.bias is not None)


def small_stem_stride(image_size: int) -> int:
    return 1 if image_size <= 32 else 2


def _small_stem(model: nn.Module, name: str, in_chans: int, stride: int) -> None:
    """Replace the downsampling stem by one 3x3 conv of ``stride`` (no pooling) before the first stage."""
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # ResNet family
        if isinstance(model.conv1, nn.Sequential):  # deep stem (resnet10t, resnet18d, ...): its first conv
            model.conv1[0] = _conv_like(model.conv1[0], in_chans, 3, stride)
        else:
            model.conv1 = _conv_like(model.conv1, in_chans, 3, stride)
        model.maxpool = nn.Identity()
    elif hasattr(model, "features") and hasattr(model.features, "conv0"):  # DenseNet
        model.features.conv0 = _conv_like(model.features.conv0, in_chans, 3, stride)
        model.features.pool0 = nn.Identity()
    elif hasattr(model, "conv_stem"):  # EfficientNet / MobileNet
        model.conv_stem = _conv_like(model.conv_stem, in_chans, 3, stride)
    elif hasattr(model, "stem") and isinstance(model.stem[0], nn.Conv2d):  # ConvNeXt patchify stem
        model.stem[0] = _conv_like(model.stem[0], in_chans, 2 * stride, 2 * stride)
    else:
        raise ConfigError(f"small_stem is not supported for backbone '{name}'; use a ResNet, DenseNet, "
                          "EfficientNet/MobileNet or ConvNeXt, or a ViT with patch_size set")


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict safely (safetensors, or torch with weights_only) skipping mismatched layers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights file '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d tensors from %s (others kept at initialisation)", len(usable), len(own), path.name)


def is_vit(name: str) -> bool:
    """timm ViT/DeiT names: patch-token models (image size and patch size set at build, no small stem)."""
    return "vit" in name or "deit" in name


def create_backbone(name: str, in_chans: int, num_classes: int, image_size: int, small_stem: bool | None = None,
                    pretrained: bool | str = False, drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """A timm model with ``num_classes`` outputs (0: a feature extractor); small_stem defaults to size <= 64."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name}*")[:5]
        raise ConfigError(f"unknown timm backbone '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
    if is_vit(name):
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("patch_size", 4 if image_size <= 64 else 16)
    hub = pretrained is True
    try:
        model = timm.create_model(name, pretrained=hub, in_chans=in_chans, num_classes=num_classes,
                                  drop_rate=drop_rate, **kwargs)
    except Exception as err:  # hub weights need network access
        if hub:
            raise ConfigError(f"could not fetch pretrained weights for '{name}' ({err}); pass a local "
                              "weights file as pretrained=PATH or train from scratch (pretrained=false)") from None
        raise
    if small_stem is None:
        small_stem = image_size <= 64 and not is_vit(name)
    if small_stem:
        _small_stem(model, name, in_chans, small_stem_stride(image_size))
    if isinstance(pretrained, str):  # after the stem swap, so small-stem checkpoints load whole
        load_weights_file(model, pretrained)
    return model
