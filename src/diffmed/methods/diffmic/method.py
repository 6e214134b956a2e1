"""DiffMIC-v2 (Yang et al., IEEE TMI 2025): label-space diffusion guided by dual-granularity priors.

Pipeline (Sec. III, Algorithms 1-2):
1. DCG stage (``fit_stages``): the DCG model (dcg.py) is trained with cross-entropy (BCE for multi-label) on its
   global and local logits, as its own Lightning stage with its own checkpoints, then frozen.
2. Dense guidance map M (Eq. 4-5): m_ij = (1 - d_ij) y_g + d_ij y_l with d_ij = |i - j| / (Np - 1).
3. Image feature prior F (Eq. 6): a transformer on the raw image and a CNN on each of the K ROIs, projected
   to H and fused by learnable weights Q (H x (K+1)); trained with the denoiser.
4. Heterologous diffusion (Eq. 7-9): the label vector broadcast to C x Np x Np, a timestep per point
   (within a band around one per-instance t, ``point_timestep_band``; the paper's independent draw leaks
   the label through the least-noisy points), noise predicted by a conv UNet (denoiser.py) from [y_t, M], F and the per-point timesteps.
5. Inference (Alg. 2, Eq. 10): y_T ~ N(M, I), DDIM on a respaced schedule (default 10 of 1000 steps,
   ``trailing``: 999, 899, ..., 99), prediction = mean of y_0 over the map. DCG, M and F are computed once.

The forward process is written as y_t = M + sqrt(a_t) (y_0 - M) + sqrt(1 - a_t) eps (CARD/DiffMIC): it is
Eq. 7 applied to the residual y - M, the only form in which the training chain ends at Eq. 10's
N(M, I). Diffusers' schedulers therefore run unchanged on the residual; without a prior (ablations c2, c5)
M = 0 and it is Eq. 7 exactly.

Table IV ablations (param ``ablation``):

| row  | diffusion | condition (UNet)           | prior map concatenated    | timesteps          |
|------|-----------|----------------------------|---------------------------|--------------------|
| c1   | none      | raw-image encoder + linear head, cross-entropy (no DCG)                     | |
| c2   | vanilla   | raw image embedding        | none (y_T ~ N(0, I))      | one per instance   |
| c3   | vanilla   | raw image embedding        | global prior y_g at every point | one per instance |
| c4   | vanilla   | raw image embedding        | local prior y_l at every point  | one per instance |
| c5   | vanilla   | F (raw + ROI, Eq. 6)       | none                      | one per instance   |
| c6   | vanilla   | F                          | dense map M               | one per instance   |
| full | heterologous | F                       | dense map M               | one per point      |
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from pydantic import Field, model_validator
from torch import nn

from diffmed.config import OptimConfig
from diffmed.data.types import TaskSpec
from diffmed.errors import ConfigError, RunError
from diffmed.methods.base import BaseParams, ClassifierMethod, StageContext
from diffmed.methods.diffmic.dcg import DCG, DCGOutput
from diffmed.methods.diffmic.denoiser import LabelDenoiser
from diffmed.methods.losses import probabilities
from diffmed.methods.registry import METHODS
from diffmed.models import create_backbone, is_vit

DCG_WEIGHTS = "dcg.safetensors"


class DiffMICParams(BaseParams):
    saved_defaults: ClassVar[dict[str, Any]] = {"readout": "clamped"}  # models saved before the readout option
    ablation: Literal["full", "c1", "c2", "c3", "c4", "c5", "c6"] = "full"
    """Table IV row (see the module docstring): full, or c1 ... c6."""
    global_backbone: str = "resnet18"
    """DCG global encoder tau_g (timm name; its feature map gives the saliency map)."""
    local_backbone: str = "resnet10t"
    """DCG local encoder tau_l on each ROI (a ResNet-10: the crops are a quarter of the image side; at 28 px the
    ResNet-18 here and in ``roi_backbone`` cost 0.8x a baseline forward between them, for ROIs of 8 px)."""
    image_backbone: str = "vit_tiny_patch16_224"
    """Transformer encoder of the raw image for F (img_size/patch_size adapted to the data)."""
    roi_backbone: str = "resnet10t"
    """CNN encoder of the ROIs for F."""
    feature_encoders: Literal["own", "dcg"] = "own"
    """Encoders behind F (rows c5, c6, full). ``own``: the paper's transformer on the image and CNN on the ROIs,
    trained with the denoiser. ``dcg``: F fuses the frozen DCG's features instead (its global encoder's pooled
    map and its local encoder's ROI embeddings, both computed anyway for the priors), through trainable
    projections and Q: two encoder passes per image instead of four (not in the paper; at 64 px the own
    encoders cost 1.5x a baseline forward between them, ``benchmarks/diffmic_cost.py``)."""
    patch_size: int | None = Field(None, ge=1)
    """ViT patch size of ``image_backbone`` (default ``default_patch_size``: a 4x4 token grid at 28 px, 8x8 at
    64 px, 16 px patches from 128 px; 49 tokens at 28 px cost 0.7x a baseline forward, 16 cost 0.2x)."""
    pretrained: bool | dict[Literal["global", "local", "image", "roi"], str] = False
    """Pretrained weights, never required. ``true``: timm hub weights for every backbone (needs network); a mapping
    from encoder (global, local, image, roi: the backbones above) to a local weights file (safetensors or a torch
    state dict), e.g. ``{global: resnet18.safetensors}``: those encoders start from the file, the others from
    scratch; layers whose shapes differ (a classifier, a ViT's patch grid) keep their initialisation."""

    def weights(self, encoder: str) -> bool | str:
        """``create_backbone``'s ``pretrained`` for one encoder."""
        return self.pretrained.get(encoder, False) if isinstance(self.pretrained, dict) else self.pretrained
    num_rois: int = Field(6, ge=1)
    """K: ROIs cropped at the most salient positions."""
    roi_size: int | None = Field(None, ge=4)
    """ROI side in pixels; default max(8, image_size // 4) (the paper: 32 of 224 px)."""
    attention_dim: int = Field(128, ge=1)
    """L: hidden size of the gated attention (Eq. 2)."""
    num_points: int = Field(6, ge=1)
    """Np: the label map is Np x Np noise points (the paper: 6)."""
    feature_dim: int = Field(256, ge=1)
    """H: dimension of the image feature prior F (the paper uses 6144 with large encoders)."""
    unet_channels: int = Field(32, ge=8, multiple_of=8)
    """Width of the label-map UNet (it runs at every DDIM step: 10 steps at 64 cost 0.6x a baseline forward at
    28 px, at 32 0.2x)."""
    emb_dim: int = Field(128, ge=1)
    """Width of the per-point (timestep + F) embedding that modulates each UNet block."""
    point_timestep_band: float | None = Field(0.1, gt=0, le=1)
    """Heterologous timesteps: every point's t is drawn within +- band * T of one per-instance t. None draws
    each point independently over [0, T) as the paper says; then almost every map holds a nearly clean point
    (97% of 6x6 maps have one with t < T/10), the UNet learns to copy the label from it instead of reading
    F and M, and at inference, where all points share t, it predicts one class for every image (measured on
    PneumoniaMNIST: val ACC fell to the majority rate after 4 epochs while the training loss went to 0.006)."""
    prediction: Literal["epsilon", "sample"] = "epsilon"
    """What the UNet predicts: the noise (Eq. 9, the paper) or the clean residual y_0 - M. With ``sample`` and
    the zero-initialised output layer, an untrained denoiser returns the DCG prior M itself."""
    timesteps: int = Field(1000, ge=2)
    """T of the training chain (linear betas)."""
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    inference_steps: int = Field(10, ge=1)
    timestep_spacing: Literal["trailing", "leading"] = "trailing"
    """DDIM respacing: trailing = T-1, T-1-T/s, ...; leading = the paper's Alg. 2 (T-T/s, ..., 0)."""
    eta: float = Field(0.0, ge=0.0)
    """DDIM stochasticity (0: deterministic given y_T)."""
    n_samples: int = Field(1, ge=1)
    """Reverse chains per image; > 1 gives a predictive mean and spread (``predict_with_uncertainty``)."""
    dcg_epochs: int = Field(20, ge=1)
    """Epochs of the DCG stage (the paper: 100)."""
    dcg_lr: float | None = Field(None, gt=0)
    """Learning rate of the DCG stage (default: optim.lr; the paper: 2e-4 with Adam)."""
    prob_floor: float = Field(1e-4, gt=0, lt=0.5)
    """``readout=clamped``: the label vector is clamped to [floor, 1 - floor] before turning it into logits."""
    readout: Literal["clamped", "logits"] = "logits"
    """How a chain's denoised label vector y_0 becomes class probabilities; the argmax is the same. ``clamped`` (the
    paper): y_0 clamped at ``prob_floor`` and renormalised. A class below the floor for most images is then ranked
    by the other classes' total, not by its own score (HAM10000 dcg seed 2: df's test AUC 0.32, the run's 0.820).
    ``logits``: y_0 as logits (softmax; sigmoid of y_0 - 0.5 per label), scaled by the engine's validation
    temperature; on the same weights it gave that run 0.909, and a higher validation AUC on average over five runs
    (``benchmarks/diffmic_readout.py``)."""
    seed: int = 0
    """Seed of the sampling noise: the same image always gets the same prediction."""
    start: Literal["shared", "per_image"] = "shared"
    """Noise of the reverse chains. ``shared``: every image gets the same S noises drawn from ``seed``. The map
    mean of one draw is N(0, 1/Np^2) per class (about 0.17 at Np = 6) and shifts every prediction the same way:
    rankings (AUC) survive, but single-chain argmaxes can pile onto one class. ``per_image``: each image's own
    noise, from ``seed`` and the image's bytes; no common shift, but each prediction is then one sample of the
    model's label posterior, and the AUC drops. Both are reproducible and independent of the batch. On
    validation, shared gave the better AUC and about the same ACC and F1 (``benchmarks/diffmic.py --sweep``)."""

    feature_loss_weight: float = Field(0.0, ge=0)
    """Weight of an auxiliary cross-entropy (BCE for multi-label) on a linear head over F, beside the diffusion
    loss (not in the paper; 0 is off). Through the label-diffusion loss alone a from-scratch image encoder gets
    little signal (ablation c2 learns nothing at 8 epochs on PneumoniaMNIST); the head is dropped at inference."""
    prior_dropout: float = Field(0.0, ge=0, lt=1)
    """Training only: each image's guidance map M is replaced, with this probability, by the uninformative prior
    (1/C per class; 0.5 per label) as the denoiser's input and as the chain's mean (not in the paper; 0 is off).
    With M always present, copying it is the easy minimum (the Table IV rows with a prior land at the prior's
    own accuracy); on the dropped maps the denoiser has to read the label from F."""

    @model_validator(mode="after")
    def _check(self) -> "DiffMICParams":
        if self.inference_steps > self.timesteps:
            raise ValueError(f"inference_steps ({self.inference_steps}) must be <= timesteps ({self.timesteps})")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be < beta_end ({self.beta_end})")
        return self


@dataclass(frozen=True)
class Variant:
    """Which parts of the graph an ablation row uses."""

    diffusion: bool
    prior: Literal["dense", "global", "local"] | None
    fused_features: bool
    """F of Eq. 6 (raw image + ROIs) as the condition, instead of the raw image embedding alone."""
    heterologous: bool

    @property
    def needs_dcg(self) -> bool:
        return self.prior is not None or self.fused_features

    @property
    def needs_local_prior(self) -> bool:
        return self.prior in ("dense", "local")


VARIANTS = {
    "c1": Variant(False, None, False, False),
    "c2": Variant(True, None, False, False),
    "c3": Variant(True, "global", False, False),
    "c4": Variant(True, "local", False, False),
    "c5": Variant(True, None, True, False),
    "c6": Variant(True, "dense", True, False),
    "full": Variant(True, "dense", True, True),
}


@dataclass
class Conditioning:
    """Everything computed from the image alone (once per image, reused at every denoising step)."""

    features: torch.Tensor
    """(N, H) image feature prior F (or the raw image embedding)."""
    prior: torch.Tensor | None
    """(N, C, Np, Np) guidance map, or None."""


def distance_matrix(num_points: int) -> torch.Tensor:
    """Eq. 4: d_ij = |i - j| / (Np - 1) (all zeros for a single point)."""
    idx = torch.arange(num_points, dtype=torch.float32)
    return (idx[:, None] - idx[None, :]).abs() / max(num_points - 1, 1)


def probs_to_logits(p: torch.Tensor, multilabel: bool, floor: float) -> torch.Tensor:
    """Probabilities -> engine logits: logit(clamp(p)) per label, or log of the clamped renormalised vector."""
    if multilabel:
        return torch.logit(p.clamp(floor, 1 - floor))
    p = p.clamp_min(floor)
    return (p / p.sum(-1, keepdim=True)).log()


def default_roi_size(image_size: int) -> int:
    return max(8, image_size // 4)


def default_patch_size(image_size: int) -> int:
    """ViT patches for F: 7 px at 28 px (4x4 tokens), 8 px up to 64 px (8x8), else 16 (the paper's 224 px)."""
    if image_size <= 32:
        return max(1, image_size // 4)
    return 8 if image_size <= 64 else 16


def image_seed(pixels: np.ndarray, seed: int) -> int:
    """A 63-bit generator seed from ``seed`` and an image's bytes: the same image gets the same noise in any batch."""
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def probe(net: nn.Module, channels: int, size: int, option: str, name: str, call=None) -> torch.Tensor:
    """``(call or net)`` on a blank ``size`` px image, ``net`` in eval mode (then restored): fail early, naming
    the option, when a backbone cannot take inputs that small."""
    was_training = net.training
    try:
        net.eval()
        return (call or net)(torch.zeros(1, channels, size, size))
    except RuntimeError as err:
        raise ConfigError(f"method.params.{option}='{name}' cannot encode {size} px inputs "
                          f"({str(err).splitlines()[0]}); choose a shallower backbone or a larger image/roi_size") from None
    finally:
        net.train(was_training)


class DCGStage(ClassifierMethod):
    """The DCG pre-training stage: cross-entropy (BCE for multi-label) on the global and the local logits.

    Validation scores the mean of the two priors' probabilities, so ``val/auc`` picks the best DCG.
    """

    def __init__(self, dcg: DCG, spec: TaskSpec, params: DiffMICParams, optim: OptimConfig, max_epochs: int,
                 class_counts: np.ndarray | None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        self.dcg = dcg.requires_grad_(True).train()  # Lightning keeps each submodule's mode at fit start

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.dcg(images)
        p = (probabilities(out.global_logits, self.spec) + probabilities(out.local_logits, self.spec)) / 2
        return probs_to_logits(p, self.spec.multilabel, self.params.prob_floor)

    def training_loss(self, batch: dict) -> torch.Tensor:
        out = self.dcg(batch["image"])
        return self.loss(out.global_logits, batch) + self.loss(out.local_logits, batch)


@METHODS.register("diffmic_v2")
class DiffMICv2(ClassifierMethod):
    """DiffMIC-v2 label-space diffusion classifier (or one of its Table IV ablations)."""

    Params = DiffMICParams

    def __init__(self, spec: TaskSpec, params: DiffMICParams, optim: OptimConfig, max_epochs: int,
                 class_counts: np.ndarray | None = None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        if spec.three_way_columns:
            raise ConfigError("method 'diffmic_v2' predicts one probability per label; data.uncertain_policy="
                              "multiclass is not supported, use ignore, zeros, ones or selftrained")
        self.variant = VARIANTS[params.ablation]
        self.class_counts = class_counts
        self.roi_size = params.roi_size or default_roi_size(spec.image_size)
        if self.roi_size > spec.image_size:
            raise ConfigError(f"method.params.roi_size={self.roi_size} exceeds data.image_size={spec.image_size}")
        c, h = spec.num_classes, params.feature_dim
        self.shared_encoders = params.feature_encoders == "dcg"
        if self.shared_encoders and not self.variant.fused_features:
            raise ConfigError(f"method.params.feature_encoders=dcg builds F from the DCG's encoders, but ablation="
                              f"{params.ablation} has no F (only c5, c6 and full do); use feature_encoders=own")
        self.dcg = self._build_dcg() if self.variant.needs_dcg else None
        if self.shared_encoders:
            self.image_proj = nn.Linear(self.dcg.global_encoder.num_features, h)
            self.roi_proj = nn.Linear(self.dcg.local_encoder.num_features, h)
        else:
            self._build_own_encoders(h)
        if self.variant.fused_features:
            k = params.num_rois
            self.fusion = nn.Parameter(torch.full((h, k + 1), 1.0 / (k + 1)))  # Q of Eq. 6
        if self.variant.diffusion:
            self.denoiser = LabelDenoiser(c, self.variant.prior is not None, h, params.unet_channels, params.emb_dim)
            chain = dict(num_train_timesteps=params.timesteps, beta_start=params.beta_start,
                         beta_end=params.beta_end, beta_schedule="linear", prediction_type=params.prediction)
            self.noise_schedule = DDPMScheduler(**chain)
            # y_0 - M lies in [-1, 1] (both are probabilities), so clipping the x0 estimate there is exact
            self.sampler = DDIMScheduler(**chain, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                                         timestep_spacing=params.timestep_spacing)
            self.sampler.set_timesteps(params.inference_steps)
        if not self.variant.diffusion or params.feature_loss_weight > 0:
            self.head = nn.Linear(h, c)  # c1's classifier, or the auxiliary head on F
        self.register_buffer("distance", distance_matrix(params.num_points), persistent=False)

    # --- construction ------------------------------------------------------------------------------
    def _build_own_encoders(self, h: int) -> None:
        """F's own image transformer (and, for the fused rows, ROI CNN), each projected to H."""
        p, spec = self.params, self.spec
        vit = {"patch_size": p.patch_size or default_patch_size(spec.image_size)} if is_vit(p.image_backbone) else {}
        self.image_encoder = create_backbone(p.image_backbone, spec.channels, 0, spec.image_size,
                                             pretrained=p.weights("image"), **vit)
        probe(self.image_encoder, spec.channels, spec.image_size, "image_backbone", p.image_backbone)
        self.image_proj = nn.Linear(self.image_encoder.num_features, h)
        if self.variant.fused_features:
            self.roi_encoder = create_backbone(p.roi_backbone, spec.channels, 0, self.roi_size,
                                               pretrained=p.weights("roi"))
            probe(self.roi_encoder, spec.channels, self.roi_size, "roi_backbone", p.roi_backbone)
            self.roi_proj = nn.Linear(self.roi_encoder.num_features, h)

    def _build_dcg(self) -> DCG:
        p, spec = self.params, self.spec
        dcg = DCG(spec.channels, spec.num_classes, spec.image_size, spec.multilabel, p.global_backbone,
                  p.local_backbone, p.num_rois, self.roi_size, p.attention_dim, p.weights("global"), p.weights("local"))
        probe(dcg.local_encoder, spec.channels, self.roi_size, "local_backbone", p.local_backbone)
        h, w = probe(dcg, spec.channels, spec.image_size, "global_backbone", p.global_backbone,
                     dcg.saliency_map).shape[-2:]
        if p.num_rois > h * w:
            raise ConfigError(f"method.params.num_rois={p.num_rois} exceeds the {h}x{w} positions of the saliency "
                              f"map of '{p.global_backbone}' at {spec.image_size} px; lower num_rois")
        return dcg.requires_grad_(False).eval()  # trained only by its own stage (fit_stages)

    @torch.no_grad()
    def plot_extras(self, images: torch.Tensor, targets: list[int], out_dir: Path) -> None:
        """plots/diffmic_trajectory.png: each image's class probabilities along the 10 DDIM steps."""
        from diffmed.report.plots import plot_trajectories

        if not self.variant.diffusion:  # c1 has no denoising trajectory
            return
        steps: list[torch.Tensor] = []
        self.sample(images, n_samples=1, trajectory=steps)
        probs = torch.stack(steps, 1)[:, :, 0].cpu().numpy()  # (N, steps, C)
        labels = [int(t) for t in self.sampler.timesteps]
        plot_trajectories(probs, labels, targets, self.spec.class_names, out_dir / "diffmic_trajectory.png")

    def frozen_submodules(self) -> list[torch.nn.Module]:
        """The DCG stays frozen in eval mode (batch-norm statistics included) during the main fit."""
        return [self.dcg] if self.dcg is not None else []

    # --- the DCG stage ------------------------------------------------------------------------------
    def fit_stages(self, ctx: StageContext) -> None:
        """Train the DCG (or reuse its finished weights), load the best epoch's weights, freeze it."""
        if self.dcg is None:
            return
        stage_dir = Path(ctx.run_dir) / "stages" / "dcg"
        weights = stage_dir / DCG_WEIGHTS
        if weights.is_file():
            self._load_dcg(weights)
        else:
            self._train_dcg(ctx, stage_dir, weights)
        self.dcg.requires_grad_(False).eval()

    def _train_dcg(self, ctx: StageContext, stage_dir: Path, weights: Path) -> None:
        from safetensors.torch import save

        from diffmed.engine.checkpoint import atomic_write_bytes, best_checkpoint_state
        from diffmed.engine.trainer import CKPT_DIR

        optim = self.optim_cfg.model_copy(update={"lr": self.params.dcg_lr}) if self.params.dcg_lr else self.optim_cfg
        stage = DCGStage(self.dcg, self.spec, self.params, optim, self.params.dcg_epochs, self.class_counts)
        trainer = ctx.make_trainer(stage_dir, max_epochs=self.params.dcg_epochs, monitor="val/auc", mode="max")
        last, best = stage_dir / CKPT_DIR / "last.ckpt", stage_dir / CKPT_DIR / "best.ckpt"
        trainer.fit(stage, datamodule=ctx.datamodule, ckpt_path=last if ctx.resume and last.is_file() else None,
                    weights_only=True)
        stage.load_state_dict(best_checkpoint_state(best if best.is_file() else last))
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().contiguous() for k, v in self.dcg.state_dict().items()}
            atomic_write_bytes(weights, save(state))

    def _load_dcg(self, weights: Path) -> None:
        from safetensors.torch import load_file

        try:
            self.dcg.load_state_dict(load_file(str(weights)))
        except RuntimeError as err:
            raise RunError(f"DCG weights {weights} do not fit this configuration ({str(err).splitlines()[0]}); "
                           f"delete {weights.parent} to retrain the DCG stage") from None

    # --- conditions: computed once per image ---------------------------------------------------------
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.spec.multilabel else torch.softmax(logits, dim=-1)

    def guidance_map(self, out: DCGOutput) -> torch.Tensor | None:
        """Eq. 5: M = (1 - D) y_g + D y_l, (N, C, Np, Np); y_g (c3) or y_l (c4) alone fill every point."""
        prior = self.variant.prior
        if prior is None:
            return None
        y_g = self._probs(out.global_logits) if prior != "local" else None
        y_l = self._probs(out.local_logits) if prior != "global" else None
        y_g, y_l = (y_g if y_g is not None else y_l), (y_l if y_l is not None else y_g)
        d = self.distance.to(y_g.dtype)
        return (1 - d) * y_g[:, :, None, None] + d * y_l[:, :, None, None]

    def image_features(self, images: torch.Tensor, dcg: DCGOutput | None) -> torch.Tensor:
        """Eq. 6: F = sum over [F_raw, F_roi^1..K] of Q (.) features, (N, H); the raw embedding alone if not fused.

        The raw and ROI features come from F's own encoders, or (``feature_encoders=dcg``) from the DCG's."""
        if self.shared_encoders:
            raw, roi = self.image_proj(dcg.global_features), self.roi_proj(dcg.roi_features)
        else:
            raw = self.image_proj(self.image_encoder(images))
            if not self.variant.fused_features:
                return raw
            n, k = dcg.rois.shape[:2]
            roi = self.roi_proj(self.roi_encoder(dcg.rois.flatten(0, 1))).view(n, k, -1)
        return (self.fusion.t() * torch.cat([raw[:, None], roi], dim=1)).sum(1)

    def condition(self, images: torch.Tensor) -> Conditioning:
        out = None
        if self.dcg is not None:
            with torch.no_grad():
                out = self.dcg(images, local=self.variant.needs_local_prior or self.shared_encoders,
                               rois=self.variant.fused_features)
        return Conditioning(self.image_features(images, out), self.guidance_map(out) if out is not None else None)

    # --- training (Algorithm 1) ------------------------------------------------------------------------
    def train_timesteps(self, n: int, device: torch.device) -> torch.Tensor:
        """(N, Np, Np) timesteps: one per point (heterologous) or one per instance (vanilla)."""
        p, t, band = self.params.num_points, self.params.timesteps, self.params.point_timestep_band
        if self.variant.heterologous and band is None:
            return torch.randint(0, t, (n, p, p), device=device)
        shared = torch.randint(0, t, (n, 1, 1), device=device)
        if not self.variant.heterologous:
            return shared.expand(n, p, p)
        width = max(1, round(band * t))
        return (shared + torch.randint(-width, width + 1, (n, p, p), device=device)).clamp(0, t - 1)

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0) with a timestep per point: points go into the batch dimension of ``add_noise``."""
        n, c, p, _ = z0.shape
        flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731
        noisy = self.noise_schedule.add_noise(flat(z0), flat(eps), t.reshape(-1))
        return noisy.view(n, p, p, c).permute(0, 3, 1, 2)

    def label_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """y_0 as a (N, C) vector (one-hot, or the 0/1 labels for multi-label) and per-entry loss weights."""
        target, c = batch["target"], self.spec.num_classes
        if self.spec.multilabel:
            weight = batch["mask"].float()
            y0 = torch.where(weight > 0, torch.nan_to_num(target.float()).clamp(0, 1), torch.zeros_like(weight))
            if self.class_weights is not None:  # pos_weight on positive entries, as in the BCE loss
                weight = weight * (1 + (self.class_weights - 1) * y0)
            return y0, weight
        y0 = target.float() if target.is_floating_point() else F.one_hot(target.long(), c).float()
        weight = torch.ones_like(y0)
        if self.class_weights is not None:
            weight = weight * (y0 * self.class_weights).sum(1, keepdim=True)
        return y0, weight

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Eq. 9: MSE between the noise (or the clean residual, ``prediction``) and its estimate over the whole
        noise-point map (c1: cross-entropy)."""
        if not self.variant.diffusion:
            return super().training_loss(batch)
        images = batch["image"]
        cond = self.drop_prior(self.condition(images))
        y0, weight = self.label_targets(batch)
        n, p = len(images), self.params.num_points
        base = cond.prior if cond.prior is not None else torch.zeros((), device=images.device)
        z0 = (y0[:, :, None, None] - base).expand(n, -1, p, p)
        t = self.train_timesteps(n, images.device)
        eps = torch.randn_like(z0)
        y_t = self.add_noise(z0, eps, t) + base
        target = eps if self.params.prediction == "epsilon" else z0
        se = (self.denoiser(y_t, cond.prior, cond.features, t).float() - target).pow(2).mean((2, 3))
        loss = (se * weight).sum() / weight.sum().clamp_min(1e-8)
        if self.params.feature_loss_weight > 0:
            loss = loss + self.params.feature_loss_weight * self.loss(self.head(cond.features), batch)
        return loss

    def drop_prior(self, cond: Conditioning) -> Conditioning:
        """``prior_dropout``: replace M of a random share of the images by the uninformative prior (training)."""
        rate = self.params.prior_dropout
        if cond.prior is None or rate == 0:
            return cond
        dropped = torch.rand(len(cond.prior), 1, 1, 1, device=cond.prior.device) < rate
        blank = 0.5 if self.spec.multilabel else 1.0 / self.spec.num_classes
        return Conditioning(cond.features, cond.prior.masked_fill(dropped, blank))

    # --- inference (Algorithm 2) -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, images: torch.Tensor, n_samples: int | None = None,
               trajectory: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(N, S, C) predicted probabilities of S reverse chains per image (seeded: same image, same output).

        ``trajectory``, when given, receives the (N, S, C) prediction implied at every DDIM step.

        The noises come from ``chain_noise``, so an image's prediction does not depend on the batch it comes in.
        DCG, M and F are computed once and reused at each DDIM step.
        """
        s = n_samples or self.params.n_samples
        n, c, p = len(images), self.spec.num_classes, self.params.num_points
        cond = self.condition(images)
        features = cond.features.repeat_interleave(s, 0)
        prior = cond.prior.repeat_interleave(s, 0).float() if cond.prior is not None else None
        base = prior if prior is not None else torch.zeros((), device=images.device)
        steps = self.sampler.timesteps
        noise = self.chain_noise(images, (1 + len(steps) * (self.params.eta > 0), s, c, p, p))
        z = noise[:, 0].flatten(0, 1)  # y_T - M ~ N(0, I), (N * S, C, Np, Np)
        for i, t in enumerate(steps):
            t_map = torch.full((n * s, p, p), int(t), device=images.device, dtype=torch.long)
            pred = self.denoiser((z + base).to(features.dtype), prior, features, t_map).float()
            extra = {} if self.params.eta == 0 else {"variance_noise": noise[:, 1 + i].flatten(0, 1)}
            out = self.sampler.step(pred, t, z, eta=self.params.eta, **extra)
            z = out.prev_sample
            if trajectory is not None:
                trajectory.append(self._clamped((out.pred_original_sample + base).mean((2, 3)).view(n, s, c)))
        y0 = (z + base).mean((2, 3)).view(n, s, c)
        return self.readout(y0)

    def readout(self, y0: torch.Tensor) -> torch.Tensor:
        """Denoised label vectors (..., C) -> class or label probabilities (``params.readout``)."""
        if self.params.readout == "clamped":
            return self._clamped(y0)
        return self._probs(y0 - 0.5 if self.spec.multilabel else y0)

    def chain_noise(self, images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(N, *shape) standard normal noise: per image, seeded by ``params.seed`` and the image's bytes, or one
        draw from ``params.seed`` repeated for every image (``start=shared``)."""
        if self.params.start == "shared":
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.params.seed))
            return noise.expand(len(images), *shape).to(images.device)
        pixels = images.detach().cpu().contiguous().numpy()
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(x, self.params.seed)))
                 for x in pixels]
        return torch.stack(draws).to(images.device)

    def _clamped(self, y: torch.Tensor) -> torch.Tensor:
        floor = self.params.prob_floor
        if self.spec.multilabel:
            return y.clamp(floor, 1 - floor)
        y = y.clamp_min(floor)
        return y / y.sum(-1, keepdim=True)

    @torch.no_grad()
    def predict_with_uncertainty(self, images: torch.Tensor,
                                 n_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean probabilities (N, C) and their spread (std over the S chains, N x C)."""
        if not self.variant.diffusion:
            probs = self._probs(self.head(self.image_features(images, None)))
            return probs, torch.zeros_like(probs)
        probs = self.sample(images, n_samples)
        return probs.mean(1), probs.std(1, unbiased=False)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.variant.diffusion:
            return self.head(self.image_features(images, None))
        mean, _ = self.predict_with_uncertainty(images)
        return probs_to_logits(mean, self.spec.multilabel, self.params.prob_floor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)

    def forward_passes_per_image(self) -> float:
        """Network evaluations per image; the unit is one denoiser evaluation of one chain's Np x Np map.

        Each encoder run counts one (DCG global encoder, DCG local encoder over the K ROIs in one batch, the
        raw-image transformer, the ROI CNN over the K ROIs), once per image; then steps x n_samples denoiser
        evaluations. The full method with the defaults: 4 + 10 = 14 (2 + 10 with ``feature_encoders=dcg``).
        c1 is one classifier pass.
        """
        v = self.variant
        if not v.diffusion:
            return 1.0
        own = 0 if self.shared_encoders else 1 + int(v.fused_features)
        encoders = own + int(v.needs_dcg) + int(v.needs_local_prior or self.shared_encoders)
        return float(encoders + self.params.inference_steps * self.params.n_samples)
