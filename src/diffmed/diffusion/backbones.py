"""Class-conditional denoising networks: a diffusers UNet and a U-ViT, with one interface.

Both take ``forward(x_t, t, class_labels=None, class_embedding=None) -> prediction`` (noise or
velocity, same shape as ``x_t``). Labels run from 0 to C-1; index C is the *null class* used for
classifier-free guidance (``class_labels=None`` means "unconditional": every row gets the null class).
``class_embedding`` (N, D) replaces the label lookup; ``embed_classes(probs)`` builds it as the
probability-weighted mix of the class embeddings, so a classifier's soft prediction can condition the
network with gradients flowing back to the probabilities (D-Cube's cycle loss needs that).

Every block's output can be read in one forward pass (D-Cube's hyper-features): ``named_blocks()``
lists them (UNet: ``down_blocks.i``, ``mid_block``, ``up_blocks.i``; U-ViT: ``in_blocks.i``,
``mid_block``, ``out_blocks.i``) and ``capture_block_outputs`` returns each as a (N, C, h, w) map
(U-ViT patch tokens are laid back on their grid; the time and label tokens are dropped).

Image sizes: the UNet halves the resolution ``levels - 1`` times, so its input side must be a
multiple of ``2 ** (levels - 1)``; the U-ViT needs a multiple of its patch size. Other sizes are
zero-padded (0 is mid-grey in the [-1, 1] scale) at the bottom/right and the prediction is cropped back,
so the loss never sees the padding. Captured feature maps keep the padded geometry.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from diffmed.errors import ConfigError

BackboneKind = Literal["unet", "uvit"]
Size = Literal["tiny", "small", "base"]
MIDDLE = "mid_block"

# UNet presets: channels per resolution level (truncated to the levels the image size needs),
# ResNet layers per level, and the largest resolution that gets self-attention.
_UNET_PRESETS = {
    # tiny: three levels, so a 28 px image reaches a 7 px bottleneck with attention there (two levels and
    # no attention (a 14 px bottleneck) drew no lung structure in 4 epochs on PneumoniaMNIST); about 1.4x the old cost
    "tiny": {"widths": (16, 32, 64), "layers": 1, "attn_res": 8, "groups": 8},
    "small": {"widths": (64, 128, 128, 256, 256, 256), "layers": 2, "attn_res": 16, "groups": 32},
    "base": {"widths": (128, 256, 256, 512, 512, 512), "layers": 2, "attn_res": 16, "groups": 32},
}
# U-ViT presets (Bao et al.): width, blocks (in + mid + out, odd), heads; base = their U-ViT-S.
_UVIT_PRESETS = {
    "tiny": {"dim": 64, "depth": 3, "heads": 2},
    "small": {"dim": 256, "depth": 9, "heads": 4},
    "base": {"dim": 512, "depth": 13, "heads": 8},
}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class DenoisingBackbone(nn.Module):
    """Shared behaviour: label handling, padding, soft class embeddings and block features."""

    def __init__(self, num_classes: int, channels: int, image_size: int, padded_size: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError("a class-conditional generator needs at least one class")
        self.num_classes, self.channels = num_classes, channels
        self.image_size, self.padded_size = image_size, padded_size

    @property
    def null_class(self) -> int:
        """Label index meaning "no class" (classifier-free guidance's unconditional branch)."""
        return self.num_classes

    # --- what subclasses provide --------------------------------------------------------------
    def label_table(self) -> nn.Embedding:  # pragma: no cover - abstract
        raise NotImplementedError

    def named_blocks(self) -> list[tuple[str, nn.Module]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_map(self, output) -> torch.Tensor:  # pragma: no cover - abstract
        """A block's raw output as an (N, C, h, w) tensor."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self.label_table().embedding_dim

    def embed_classes(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities -> (N, D) conditioning: ``probs @ embedding.weight[:C]``."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes}), got {tuple(probs.shape)}")
        weight = self.label_table().weight[: self.num_classes]
        return probs.to(weight.dtype) @ weight

    def labels_or_null(self, class_labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if class_labels is None:
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        return class_labels.to(device=device, dtype=torch.long).reshape(n)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.padded_size - x.shape[-1]
        return F.pad(x, (0, extra, 0, extra)) if extra else x

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.image_size, : self.image_size]

    @staticmethod
    def _timesteps(t: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        return t.expand(n) if t.ndim == 0 else t.reshape(n)


class UNetBackbone(DenoisingBackbone):
    """diffusers ``UNet2DModel``; the class embedding (C + 1 rows) is added to the time embedding."""

    def __init__(self, num_classes: int, channels: int, image_size: int, size: Size = "small",
                 dropout: float = 0.0) -> None:
        preset = _UNET_PRESETS[size]
        # levels so that the lowest resolution is about 4-8 px: 28/32 -> 3, 64 -> 4, 128 -> 5, 224/256 -> 6
        levels = min(len(preset["widths"]), 1 + max(1, round(math.log2(image_size / 6))))
        padded = _round_up(image_size, 2 ** (levels - 1))
        super().__init__(num_classes, channels, image_size, padded)
        widths = preset["widths"][:levels]
        attn = [0 < i and padded // 2**i <= preset["attn_res"] for i in range(levels)]
        self.unet = UNet2DModel(
            sample_size=padded, in_channels=channels, out_channels=channels, layers_per_block=preset["layers"],
            block_out_channels=widths, norm_num_groups=preset["groups"], dropout=dropout,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=32, resnet_time_scale_shift="scale_shift", num_class_embeds=num_classes + 1,
        )

    def label_table(self) -> nn.Embedding:
        return self.unet.class_embedding

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        down = [(f"down_blocks.{i}", b) for i, b in enumerate(self.unet.down_blocks)]
        up = [(f"up_blocks.{i}", b) for i, b in enumerate(self.unet.up_blocks)]
        return down + [(MIDDLE, self.unet.mid_block)] + up

    def feature_map(self, output) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output  # down blocks return (hidden, skips)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        labels = self.labels_or_null(class_labels, n, x_t.device)
        with _replace_output(self.unet.class_embedding, class_embedding):
            out = self.unet(self._pad(x_t), self._timesteps(t, n, x_t.device), class_labels=labels).sample
        return self._crop(out)


@contextmanager
def _replace_output(module: nn.Module, value: torch.Tensor | None) -> Iterator[None]:
    """While active, ``module`` returns ``value`` instead of its own output (None: no change)."""
    if value is None:
        yield
        return
    handle = module.register_forward_hook(lambda _m, _i, out: value.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class UViTBlock(nn.Module):
    """Pre-norm transformer block; second-half blocks first merge the long skip: linear(cat(x, skip))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, skip: bool = False) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(DenoisingBackbone):
    """U-ViT (Bao et al., 2023): every input is a token (time, label, image patches); long skips join
    the i-th first-half block to the mirrored second-half block."""

    EXTRA_TOKENS = 2  # time token, label token

    def __init__(self, num_classes: int, channels: int, image_size: int, size: Size = "small",
                 dropout: float = 0.0) -> None:
        preset = _UVIT_PRESETS[size]
        dim, depth, heads = preset["dim"], preset["depth"], preset["heads"]
        # patches of 2 px up to 32 px images, then at most a 16 x 16 token grid (64 px -> 4, 256 px -> 16)
        patch = max(2, 2 ** math.ceil(math.log2(image_size / 16)))
        super().__init__(num_classes, channels, image_size, _round_up(image_size, patch))
        self.patch, self.grid, self.dim = patch, self.padded_size // patch, dim
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.time_embed = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.label_embed = nn.Embedding(num_classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.EXTRA_TOKENS + self.grid**2, dim))
        half = (depth - 1) // 2
        self.in_blocks = nn.ModuleList(UViTBlock(dim, heads, dropout) for _ in range(half))
        self.mid_block = UViTBlock(dim, heads, dropout)
        self.out_blocks = nn.ModuleList(UViTBlock(dim, heads, dropout, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch * channels)
        self.final_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def label_table(self) -> nn.Embedding:
        return self.label_embed

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        first = [(f"in_blocks.{i}", b) for i, b in enumerate(self.in_blocks)]
        second = [(f"out_blocks.{i}", b) for i, b in enumerate(self.out_blocks)]
        return first + [(MIDDLE, self.mid_block)] + second

    def feature_map(self, output: torch.Tensor) -> torch.Tensor:
        tokens = output[:, self.EXTRA_TOKENS:]
        return tokens.transpose(1, 2).reshape(len(output), self.dim, self.grid, self.grid)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        patches = self.patch_embed(self._pad(x_t)).flatten(2).transpose(1, 2)
        steps = get_timestep_embedding(self._timesteps(t, n, x_t.device), self.dim, flip_sin_to_cos=True,
                                       downscale_freq_shift=0)
        time_token = self.time_embed(steps.to(patches.dtype))[:, None]
        if class_embedding is None:
            class_embedding = self.label_embed(self.labels_or_null(class_labels, n, x_t.device))
        x = torch.cat([time_token, class_embedding.to(patches.dtype)[:, None], patches], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        out = self.head(self.norm(x))[:, self.EXTRA_TOKENS:]
        return self._crop(self.final_conv(self._unpatchify(out)))

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        n, g, p, c = len(tokens), self.grid, self.patch, self.channels
        x = tokens.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_BACKBONES = {"unet": UNetBackbone, "uvit": UViT}


def build_backbone(kind: BackboneKind, num_classes: int, channels: int, image_size: int, size: Size = "small",
                   dropout: float = 0.0) -> DenoisingBackbone:
    """A denoising network for ``image_size`` px images with ``channels`` channels and C + 1 labels."""
    if kind not in _BACKBONES:
        raise ConfigError(f"backbone '{kind}' is not one of {sorted(_BACKBONES)}")
    if not 8 <= image_size <= 512:
        raise ConfigError(f"data.image_size={image_size}: the diffusion backbones support 8-512 px")
    return _BACKBONES[kind](num_classes, channels, image_size, size, dropout)


# ------------------------------------------------------------------ reading block outputs


@contextmanager
def capturing(model: DenoisingBackbone, names: list[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the named blocks' outputs (as feature maps) of every forward pass run inside the block.

    The stored tensors keep their autograd graph, so a loss on them trains the backbone.
    """
    blocks = dict(model.named_blocks())
    unknown = sorted(set(names or []) - set(blocks))
    if unknown:
        raise ConfigError(f"unknown block(s) {unknown}; this backbone has {list(blocks)}")
    store: dict[str, torch.Tensor] = {}

    def hook(name: str):
        return lambda _m, _i, out: store.__setitem__(name, model.feature_map(out))

    handles = [blocks[n].register_forward_hook(hook(n)) for n in (names or list(blocks))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Captured(Exception):
    """Raised by the hook of the last requested block: the rest of the network is not run."""


def capture_block_outputs(model: DenoisingBackbone, x_t: torch.Tensor, t: torch.Tensor | int,
                          class_labels: torch.Tensor | None = None, class_embedding: torch.Tensor | None = None,
                          names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every (or the named) block's output of one forward pass, in network order, as (N, C, h, w).

    With ``names`` the pass stops after the last named block (reading the middle block costs about
    half a forward pass).
    """
    order = [n for n, _ in model.named_blocks()]
    with capturing(model, names) as store:
        if names:
            last = max(names, key=order.index)
            stop = dict(model.named_blocks())[last].register_forward_hook(lambda *_: _raise_captured())
        try:
            model(x_t, t, class_labels, class_embedding)
        except _Captured:
            pass
        finally:
            if names:
                stop.remove()
    return {n: store[n] for n in order if n in store}


def _raise_captured() -> None:
    raise _Captured


def pool_features(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C) by spatial averaging."""
    return feature_map.mean(dim=(2, 3))


def middle_features(model: DenoisingBackbone, x_t: torch.Tensor, t: torch.Tensor | int,
                    class_labels: torch.Tensor | None = None,
                    class_embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Spatially pooled output of the middle block, (N, C): the features D-Cube's L_Cont acts on."""
    return pool_features(capture_block_outputs(model, x_t, t, class_labels, class_embedding, [MIDDLE])[MIDDLE])
