"""The latent diffusion transformer (DiT, Peebles & Xie) with three conditioning modes (Ukita et al.).

* ``unconditional``: the adaLN conditioning vector is the timestep embedding alone;
* ``class``: timestep + label embedding; label ``num_classes`` is the null class (label dropout
  during tuning, unconditional predictions);
* ``representation``: timestep + r = f_phi(z_0), where f_phi is a small ViT (timm) over the clean
  latent trained jointly with the denoiser. As in the paper's Fig. 2, r enters twice: added to
  every token at the input, and at the start of every block (and of the final layer), each through
  its own projection into that block's adaLN conditioning vector.

The blocks are written here rather than taken from ``diffusers.BasicTransformerBlock`` because its
``ada_norm_zero`` mode embeds (timestep, class label) *inside every block* with its own
``CombinedTimestepLabelEmbeddings``: it cannot take a conditioning vector computed outside (needed
for r, and for one label embedding shared by all blocks as in DiT), and weights could not be carried
between modes. The pieces that fit are diffusers': ``PatchEmbed`` (fixed 2-D sin-cos positions),
``Timesteps`` + ``TimestepEmbedding``, ``Attention`` and ``FeedForward``. Initialisation follows DiT
(adaLN-Zero: every block starts as the identity, the output layer at zero).

The network predicts epsilon (no learned variance: the classifier and the DDPM loss need only epsilon).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from torch import nn

from diffmed.errors import ConfigError

MODES: tuple[str, ...] = ("unconditional", "class", "representation")
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 4, "hidden": 128, "heads": 4, "patch_size": 4},  # trains on 2 CPU cores at 28 px
    "S": {"depth": 12, "hidden": 384, "heads": 6, "patch_size": 2},    # DiT-S (paper's footnote table)
    "B": {"depth": 12, "hidden": 768, "heads": 12, "patch_size": 2},   # DiT-B, the paper's model
}
CONDITIONING_PREFIXES = ("encoder.", "rep_in.", "rep_blocks.", "y_embed.")
"""Parameters that belong to a conditioning mode; everything else is shared between modes."""
FREQ_DIM = 256


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int
    input_size: int
    patch_size: int = 2
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    mode: str = "unconditional"
    num_classes: int = 0
    rep_dim: int = 0
    rep_depth: int = 0
    rep_heads: int = 0
    rep_patch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return cls(**d)

    def backbone(self) -> dict:
        """The fields every mode shares: two configs with equal backbones can exchange weights."""
        return {k: v for k, v in asdict(self).items() if k not in ("mode", "num_classes") and not k.startswith("rep_")}


def dit_config(size: str, in_channels: int, input_size: int, mode: str = "unconditional",
               patch_size: int | None = None, num_classes: int = 0, rep_dim: int | None = None,
               rep_depth: int | None = None) -> DiTConfig:
    """A preset (tiny, S, B) for a latent of ``in_channels`` x ``input_size``^2, validated."""
    if size not in PRESETS:
        raise ConfigError(f"method.params.size='{size}' is unknown; choose one of {', '.join(PRESETS)}")
    if mode not in MODES:
        raise ConfigError(f"DiT mode '{mode}' is unknown; choose one of {', '.join(MODES)}")
    p = dict(PRESETS[size])
    default_patch = p.pop("patch_size")
    patch = patch_size or default_patch
    if input_size % patch:
        raise ConfigError(f"method.params.patch_size={patch} does not divide the latent size {input_size}; "
                          "pick a divisor (e.g. 2 or 4 at 28 px)")
    if mode == "class" and num_classes < 2:
        raise ConfigError("a class-conditioned DiT needs at least two classes")
    rep = {}
    if mode == "representation":
        rep = {"rep_dim": rep_dim or p["hidden"], "rep_depth": rep_depth or max(1, p["depth"] // 2),
               "rep_heads": p["heads"], "rep_patch": patch}
        if rep["rep_dim"] % rep["rep_heads"]:
            raise ConfigError(f"method.params.rep_dim={rep['rep_dim']} must be a multiple of {rep['rep_heads']} heads")
    return DiTConfig(in_channels=in_channels, input_size=input_size, patch_size=patch, mode=mode,
                     num_classes=num_classes if mode == "class" else 0, **p, **rep)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning vector (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(query_dim=hidden, heads=heads, dim_head=hidden // heads, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(hidden, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """The paper's "decode": adaLN norm, linear to patch pixels, unpatchify."""

    def __init__(self, hidden: int, patch: int, channels: int) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        x = self.linear(modulate(self.norm(x), shift, scale))
        n, tokens, _ = x.shape
        side, p = int(round(tokens ** 0.5)), self.patch
        x = x.reshape(n, side, side, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, self.channels, side * p, side * p)


def representation_encoder(cfg: DiTConfig) -> nn.Module:
    """f_phi: a small timm ViT over the clean latent z_0; its class token is r (rep_dim)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.input_size, patch_size=cfg.rep_patch, in_chans=cfg.in_channels,
                             num_classes=0, embed_dim=cfg.rep_dim, depth=cfg.rep_depth, num_heads=cfg.rep_heads,
                             mlp_ratio=cfg.mlp_ratio, global_pool="token")


class LatentDiT(nn.Module):
    """g_theta(z_t, t, condition) -> predicted noise epsilon, same shape as z_t."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.mode not in MODES:
            raise ConfigError(f"DiT mode '{cfg.mode}' is unknown; choose one of {', '.join(MODES)}")
        self.cfg = cfg
        h = cfg.hidden
        self.patch = PatchEmbed(height=cfg.input_size, width=cfg.input_size, patch_size=cfg.patch_size,
                                in_channels=cfg.in_channels, embed_dim=h)
        self.t_freq = Timesteps(FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embed = TimestepEmbedding(FREQ_DIM, h)
        if cfg.mode == "class":
            self.y_embed = nn.Embedding(cfg.num_classes + 1, h)
        if cfg.mode == "representation":
            self.encoder = representation_encoder(cfg)
            self.rep_in = nn.Linear(cfg.rep_dim, h)
            self.rep_blocks = nn.ModuleList(nn.Linear(cfg.rep_dim, h) for _ in range(cfg.depth + 1))
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(h, cfg.patch_size, cfg.in_channels)
        self.reset_parameters()

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layer."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("encoder"):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.proj.bias)
        for lin in (self.t_embed.linear_1, self.t_embed.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        if self.cfg.mode == "class":
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.final.ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def represent(self, z0: torch.Tensor) -> torch.Tensor:
        """r = f_phi(z_0) (Eq. 1), the representation used for conditioning and the linear probe."""
        if self.cfg.mode != "representation":
            raise RuntimeError(f"a {self.cfg.mode} DiT has no representation encoder")
        return self.encoder(z0)

    def _conditions(self, t: torch.Tensor, y: torch.Tensor | None, r: torch.Tensor | None,
                    dtype: torch.dtype) -> list[torch.Tensor]:
        """One conditioning vector per block plus one for the final layer."""
        c = self.t_embed(self.t_freq(t).to(dtype))
        if self.cfg.mode == "class":
            if y is None:
                y = torch.full_like(t, self.null_label, dtype=torch.long)
            c = c + self.y_embed(y)
        if self.cfg.mode == "representation":
            return [c + proj(r) for proj in self.rep_blocks]
        return [c] * (self.cfg.depth + 1)

    def _inputs(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, z0: torch.Tensor | None,
                r: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if t.ndim == 0:
            t = t.expand(len(z_t))
        if self.cfg.mode == "representation" and r is None:
            if z0 is None:
                raise ValueError("a representation-conditioned DiT needs z0 (or r) as its condition")
            r = self.represent(z0)
        x = self.patch(z_t)
        if r is not None and self.cfg.mode == "representation":
            x = x + self.rep_in(r)[:, None]
        return x, self._conditions(t, y, r, x.dtype)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                z0: torch.Tensor | None = None, r: torch.Tensor | None = None) -> torch.Tensor:
        """epsilon prediction; ``y`` for class mode (None: null class), ``z0`` or ``r`` for representation mode."""
        x, conds = self._inputs(z_t, t, y, z0, r)
        for block, c in zip(self.blocks, conds):
            x = block(x, c)
        return self.final(x, conds[-1])

    def hidden_features(self, z_t: torch.Tensor, t: torch.Tensor, block: int, y: torch.Tensor | None = None,
                        z0: torch.Tensor | None = None, r: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled tokens after ``block`` blocks (denoising-autoencoder features for a probe)."""
        x, conds = self._inputs(z_t, t, y, z0, r)
        for b, c in zip(self.blocks[:block], conds):
            x = b(x, c)
        return x.mean(1)


def shared_state(model: LatentDiT) -> dict[str, torch.Tensor]:
    """The weights every conditioning mode has (patch/timestep embedding, blocks, final layer)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(CONDITIONING_PREFIXES)}


def load_shared_weights(src: LatentDiT, dst: LatentDiT, where: str = "the pre-trained DiT") -> list[str]:
    """Copy ``src``'s shared weights into ``dst``; returns the names ``dst`` keeps at initialisation."""
    if src.cfg.backbone() != dst.cfg.backbone():
        diff = {k: (v, dst.cfg.backbone()[k]) for k, v in src.cfg.backbone().items() if dst.cfg.backbone()[k] != v}
        raise ConfigError(f"{where} does not match this model's architecture (pre-trained vs now: {diff}); "
                          "use the same size, patch_size and autoencoder as in pre-training")
    missing, unexpected = dst.load_state_dict(shared_state(src), strict=False)
    if unexpected:  # cannot happen with equal backbones; guards future edits
        raise RuntimeError(f"unexpected weights {unexpected[:3]}")
    return list(missing)


def to_class_conditional(pretrained: LatentDiT, num_classes: int) -> LatentDiT:
    """Downstream tuning model: representation conditioning removed, a new label embedding (N(0, 0.02),
    with a null class) added, every shared weight carried over from ``pretrained``."""
    cfg = replace(pretrained.cfg, mode="class", num_classes=num_classes, rep_dim=0, rep_depth=0, rep_heads=0,
                  rep_patch=0)
    model = LatentDiT(cfg)
    load_shared_weights(pretrained, model)
    return model.to(next(pretrained.parameters()).device)
