"""Grad-CAM (captum) on a few test images for CNN methods built on a timm backbone."""
from __future__ import annotations

from pathlib import Path

import torch
from captum.attr import LayerAttribution, LayerGradCam

from diffmed.report.plots import _figure, _save


def gradcam_layer(net: torch.nn.Module) -> torch.nn.Module | None:
    """The last convolutional stage timm reports (None for token models, where Grad-CAM does not apply)."""
    info = getattr(net, "feature_info", None)
    if not info or hasattr(net, "patch_embed"):  # ViT, DeiT, Swin, ...: their stages output tokens
        return None
    return net.get_submodule(info[-1]["module"])


def plot_gradcam(method, images: torch.Tensor, targets: list[int], class_names: list[str], path: Path) -> Path | None:
    """Overlay Grad-CAM maps of each image's predicted class; returns None when the method has no CNN."""
    net = getattr(method, "net", None)
    layer = gradcam_layer(net) if net is not None else None
    if layer is None:
        return None
    method.eval()
    with torch.enable_grad():
        logits = method(images)
        pred = logits.argmax(1)
        cam = LayerGradCam(method, layer).attribute(images, target=pred)
    if cam.ndim != 4:  # a stage without a spatial map (a token model timm does not mark): nothing to overlay
        return None
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), "bilinear").relu().detach()
    n = len(images)
    fig, axes = _figure(2.2 * n, 2.6, ncols=n, squeeze=False)
    for i, ax in enumerate(axes[0]):
        img = images[i].float()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
        ax.imshow(cam[i, 0].numpy(), cmap="jet", alpha=0.4)
        ax.set_title(f"true {class_names[targets[i]]}\npred {class_names[int(pred[i])]}", fontsize=8)
        ax.axis("off")
    return _save(fig, path)
