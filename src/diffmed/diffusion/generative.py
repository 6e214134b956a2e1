"""The class-conditional diffusion model: training objective, EMA weights, export and loading.

Objective (D-Cube, Jang et al., Sec. III-B step 1, Eq. 5):
``L_Gen = L_Diff(x_t^1) + L_Diff(x_t^2) + lambda_cont * L_Cont``. Each image i of a batch is paired with
a partner j (a random permutation of the batch); both are noised at the *same* timestep t_i with their
own noise, both are denoised in one forward pass, and L_Cont acts on the middle block's spatially
pooled features of the pair: same-class pairs are pulled together, different-class pairs are pushed
at least ``margin`` apart.

Scale of the margin: the pooled features are L2-normalised, so the pair distance lies in [0, 2]
(``d = sqrt(2 - 2 cos)``; orthogonal features are sqrt(2) ~ 1.41 apart). The default margin 1.0 asks
different classes for cosine similarity below 0.5. The public D-Cube code uses raw features, whose
distances are in the tens to hundreds, with margin 0.1: the hinge never acts there. The loss is the
mean over pairs (the paper's sum grows with the batch size).

``use_contrastive=False`` is the ablation: the standard DDPM objective on one noised view per image.
Since L_Diff(x^1) + L_Diff(x^2) is a two-sample estimate of 2 L_Diff, and Adam is invariant to a
constant loss factor, the expected update differs from L_Gen by the L_Cont term alone.

Which features: by default those of the label-conditioned denoising pass, as in the paper. There the
label embedding alone can separate the classes (at init the UNet's different-class pairs are already
farther apart than same-class ones, through the label path), so L_Cont need not shape image content.
``contrast_on="null"`` computes L_Cont on an extra null-class pass of the same noisy images instead --
the features a classifier reads when it does not know the label.

Classifier-free guidance (Ho & Salimans): labels are replaced by the null class (index C) with
probability ``cfg_drop_prob``, independently for each view. EMA weights are kept in the module (so they
are checkpointed and resumed with it) and are the weights exported and used for sampling.
"""
from __future__ import annotations

import copy
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save

from diffmed.data.types import TaskSpec
from diffmed.diffusion.backbones import (MIDDLE, BackboneKind, DenoisingBackbone, Size, build_backbone,
                                         capture_block_outputs, capturing, pool_features)
from diffmed.diffusion.schedule import BetaSchedule, PredictionType, training_scheduler, training_target
from diffmed.errors import ConfigError, RunError

log = logging.getLogger("diffmed.diffusion")
GENERATOR_DIR = "generator"
PARAMS_FILE = "generator_params.json"
SAMPLES_DIR = "samples"


class GenerativeParams(BaseModel):
    """Options of the class-conditional generator (``diffmed generator train -p key=value``)."""

    model_config = ConfigDict(extra="forbid")
    backbone: BackboneKind = "unet"
    size: Size = "small"
    """tiny (tests, smoke runs) | small (trains on CPU at 28-64 px) | base (GPU)."""
    prediction_type: PredictionType = "epsilon"
    beta_schedule: BetaSchedule = "linear"
    num_train_timesteps: int = Field(1000, ge=10)
    cfg_drop_prob: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability of training a label as the null class (classifier-free guidance)."""
    use_contrastive: bool = True
    """D-Cube's L_Gen (paired views + L_Cont); False: the plain DDPM objective (the ablation)."""
    lambda_cont: float = Field(1.0, ge=0.0)
    margin: float = Field(1.0, gt=0.0, le=2.0)
    """Hinge margin on the distance of L2-normalised pooled middle features (range 0..2)."""
    contrast_on: Literal["label", "null"] = "label"
    """Middle features L_Cont acts on: those of the label-conditioned denoising pass (the paper), or of
    an extra pass of the same noisy images with the null class (+ about half a forward pass per view),
    which shapes the label-free features a downstream classifier reads when the label is unknown."""
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0)
    """EMA of the weights used for sampling and export (warm-up: min(decay, (1+s)/(10+s))); None: off."""
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    max_epochs: int | None = Field(None, ge=1)
    """Epochs of generator training; default: train.max_epochs."""
    sample_every_n_epochs: int | None = Field(10, ge=1)
    """Save a per-class sample grid (PNG) under the log folder every N epochs and at the end; None: off."""
    sample_per_class: int = Field(8, ge=1)
    sample_steps: int = Field(50, ge=1)
    sample_seed: int = 0


def parse_params(params: dict | GenerativeParams) -> GenerativeParams:
    """Validate generator options; unknown or bad keys raise ConfigError naming them."""
    if isinstance(params, GenerativeParams):
        return params
    try:
        return GenerativeParams.model_validate(params or {})
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid generator parameters:\n" + "\n".join(lines)) from None


SAMPLING_PARAMS = ("sample_every_n_epochs", "sample_per_class", "sample_steps", "sample_seed")
"""Generator params that only shape the sample grids logged in training, not the weights."""


def generator_param_changes(path: Path, params: dict | GenerativeParams) -> list[str]:
    """The options (sample grids aside) in which ``params`` differ from those the generator of ``path`` was
    trained with, as ``key: trained -> asked``."""
    theirs = read_generator_meta(path)["params"]
    ours = {k: v for k, v in parse_params(params).model_dump().items() if k not in SAMPLING_PARAMS}
    return [f"generator {k}: {theirs.get(k)!r} -> {v!r}" for k, v in ours.items() if theirs.get(k) != v]


def contrastive_loss(f1: torch.Tensor, f2: torch.Tensor, same: torch.Tensor,
                     margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D-Cube's Eq. 4 on L2-normalised features, averaged over pairs.

    Returns the loss and the per-pair distance (in [0, 2]). ``same`` is True where the pair shares a class.
    """
    d = pair_distance(f1, f2)
    per_pair = torch.where(same, d, F.relu(margin - d))
    return per_pair.mean(), d


def pair_distance(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of the L2-normalised rows (the epsilon keeps the gradient finite at d = 0)."""
    z1, z2 = F.normalize(f1.float(), dim=1), F.normalize(f2.float(), dim=1)
    return ((z1 - z2).pow(2).sum(dim=1) + 1e-12).sqrt()


class ClassConditionalDiffusion(L.LightningModule):
    """A class-conditional DDPM over a UNet or U-ViT backbone (C classes + the null class)."""

    def __init__(self, spec: TaskSpec, params: GenerativeParams | dict, class_counts: np.ndarray | None = None,
                 with_ema: bool = True) -> None:
        super().__init__()
        if spec.multilabel:
            raise ConfigError("the class-conditional generator needs single-label data (binary, multiclass "
                              "or ordinal); this dataset is multi-label")
        self.spec, self.params = spec, parse_params(params)
        p = self.params
        self.class_counts = None if class_counts is None else [int(c) for c in class_counts]
        self.backbone: DenoisingBackbone = build_backbone(p.backbone, spec.num_classes, spec.channels,
                                                          spec.image_size, p.size, p.dropout)
        self.ema_backbone: DenoisingBackbone | None = None
        if with_ema and p.ema_decay:
            self.ema_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.noise_scheduler = training_scheduler(p.beta_schedule, p.prediction_type, p.num_train_timesteps)

    @property
    def sampling_network(self) -> DenoisingBackbone:
        """The weights that generate images and give features: the EMA copy when there is one."""
        return self.ema_backbone if self.ema_backbone is not None else self.backbone

    @property
    def null_class(self) -> int:
        return self.backbone.null_class

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction with the sampling (EMA) weights."""
        return self.sampling_network(x_t, t, class_labels, class_embedding)

    # --- objective -----------------------------------------------------------------------------
    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability ``cfg_drop_prob`` (global RNG, seeded per epoch)."""
        drop = torch.rand(labels.shape, device=labels.device) < self.params.cfg_drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def generative_loss(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_Gen (or the plain DDPM loss when ``use_contrastive`` is off) and its parts for logging."""
        n = len(x0)
        t = torch.randint(0, self.params.num_train_timesteps, (n,), device=x0.device)
        if not self.params.use_contrastive:
            diff = self._diffusion_loss(x0, labels, t)[0]
            return diff, {"diff": diff.detach()}
        partner = torch.randperm(n, device=x0.device)
        t2 = torch.cat([t, t])
        on_labels = self.params.contrast_on == "label"
        with capturing(self.backbone, [MIDDLE]) if on_labels else nullcontext({}) as feats:
            diff, x_t = self._diffusion_loss(torch.cat([x0, x0[partner]]), torch.cat([labels, labels[partner]]), t2)
        if not on_labels:
            feats = capture_block_outputs(self.backbone, x_t, t2, None, names=[MIDDLE])
        mid = pool_features(feats[MIDDLE])
        same = labels == labels[partner]
        cont, d = contrastive_loss(mid[:n], mid[n:], same, self.params.margin)
        loss = 2.0 * diff + self.params.lambda_cont * cont  # 2 x mean = L_Diff(x^1) + L_Diff(x^2)
        # share of pairs whose hinge pushes (different classes closer than the margin)
        active = ((~same) & (d < self.params.margin)).float().mean()
        return loss, {"diff": diff.detach(), "cont": cont.detach(), "hinge_active": active}

    def _diffusion_loss(self, x0: torch.Tensor, labels: torch.Tensor,
                        t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of the prediction on freshly noised ``x0`` (labels dropped for CFG); returns (loss, x_t)."""
        noise = torch.randn_like(x0)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.backbone(x_t, t, self.drop_labels(labels))
        return F.mse_loss(pred.float(), training_target(self.noise_scheduler, x0, noise, t).float()), x_t

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.generative_loss(batch["image"], batch["target"].long())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"generator loss became {loss.item()} at step {self.global_step}; "
                                     "lower the generator lr or set train.grad_clip")
        n = len(batch["image"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, batch_size=n,
                      sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=self.params.lr, weight_decay=self.params.weight_decay)
        warmup = self.params.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- EMA and sample grids ------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema_backbone is not None:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA step with the usual warm-up so that short runs are not stuck near the initial weights."""
        step = self.global_step
        decay = min(self.params.ema_decay, (1 + step) / (10 + step))
        ema = list(self.ema_backbone.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.backbone.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.ema_backbone.buffers(), self.backbone.buffers()):
            b_ema.copy_(b)

    def on_train_epoch_end(self) -> None:
        every = self.params.sample_every_n_epochs
        epoch = self.current_epoch + 1
        last = self.trainer.max_epochs is not None and epoch >= self.trainer.max_epochs
        if every and (epoch % every == 0 or last) and self.trainer.is_global_zero:
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / SAMPLES_DIR
            save_sample_grid(self, folder / f"epoch_{epoch:04d}.png")

    # --- export ---------------------------------------------------------------------------------------
    def export(self, out_dir: Path, extra: dict | None = None) -> Path:
        """Write ``model.safetensors`` (the sampling weights, EMA when on) and ``model.json`` to ``out_dir``."""
        from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json

        state = {k: v.detach().cpu().contiguous() for k, v in self.sampling_network.state_dict().items()}
        atomic_write_bytes(out_dir / "model.safetensors", save(state))
        meta = {"params": self.params.model_dump(), "spec": self.spec.to_dict(),
                "weights": "ema" if self.ema_backbone is not None else "raw",
                "class_counts": None if self.class_counts is None else dict(zip(self.spec.class_names,
                                                                                self.class_counts)),
                **(extra or {})}
        atomic_write_json(out_dir / "model.json", meta)
        return out_dir


def save_sample_grid(model: ClassConditionalDiffusion, path: Path) -> Path:
    """One row of ``sample_per_class`` DDIM samples per class, with a fixed seed (comparable over epochs)."""
    from torchvision.utils import save_image

    from diffmed.diffusion.sampling import sample

    p = model.params
    labels = torch.arange(model.spec.num_classes).repeat_interleave(p.sample_per_class)
    images = sample(model, labels, generator=torch.Generator().manual_seed(p.sample_seed), steps=p.sample_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=p.sample_per_class, padding=1)
    return path


# ------------------------------------------------------------------ training entry points


def without_weight_averaging(trainer: L.Trainer) -> L.Trainer:
    """Drop a trainer-level EMA (``train.ema_decay`` of a stage trainer): the generator keeps its own EMA,
    and a second one would average the EMA copy again and swap raw weights into the backbone."""
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    if any(isinstance(c, WeightAveraging) for c in trainer.callbacks):
        log.info("generator training: using the module's own EMA instead of the trainer's")
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    return trainer


def fit_generator(spec: TaskSpec, params: GenerativeParams | dict, datamodule: L.LightningDataModule,
                  out_dir: Path, make_trainer: Callable, max_epochs: int, class_counts: np.ndarray | None = None,
                  resume: bool = False, meta: dict | None = None) -> ClassConditionalDiffusion:
    """Train a generator into ``out_dir`` (checkpoints, logs, sample grids) and export it to
    ``out_dir/generator/``; reusable as a method's pre-training stage (``make_trainer`` from StageContext).

    The exported weights are those after the last epoch (EMA): a training-loss "best" is not a model
    selection criterion for a generator.
    """
    from diffmed.engine.trainer import CKPT_DIR, training_clock

    out_dir = Path(out_dir)
    module = ClassConditionalDiffusion(spec, params, class_counts)
    trainer = without_weight_averaging(make_trainer(out_dir, max_epochs, "train/loss", "min"))
    last = out_dir / CKPT_DIR / "last.ckpt"
    if resume and not last.is_file():
        log.warning("no last checkpoint in %s yet: training the generator from scratch", out_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume and last.is_file() else None,
                weights_only=True)
    if trainer.is_global_zero:
        module.export(out_dir / GENERATOR_DIR, {**(meta or {}), "epochs": trainer.current_epoch,
                                                "global_step": trainer.global_step,
                                                "train_seconds": training_clock(trainer).seconds})
    return module


def train_generator(cfg, run_dir: Path, params: dict | None = None, resume: bool = False) -> Path:
    """``diffmed generator train``: fit a generator on the training split of ``cfg.data`` into ``run_dir``.

    Only real training images are used (never validation/test images, never earlier synthetic ones).
    Returns the run folder; the generator is in ``run_dir/generator/``.
    """
    from diffmed.config import load_config, save_config
    from diffmed.engine.checkpoint import atomic_write_json
    from diffmed.engine.data import make_datamodule, prepare_data
    from diffmed.engine.run import CONFIG_FILE, is_ddp_child, open_run_dir
    from diffmed.engine.seed import seed_all
    from diffmed.engine.trainer import build_trainer

    run_dir = open_run_dir(Path(run_dir), resume, command="diffmed generator train")
    if resume or is_ddp_child():
        cfg = load_config(run_dir / CONFIG_FILE)
        params = json.loads((run_dir / PARAMS_FILE).read_text())
    else:
        gp = parse_params(params or {})  # fail before anything is written
        save_config(cfg, run_dir / CONFIG_FILE)
        atomic_write_json(run_dir / PARAMS_FILE, gp.model_dump())
    gp = parse_params(params or {})
    seed_all(cfg.train.seed)
    data = prepare_data(cfg, run_dir)
    train = data.sets["train"]
    if train.synthetic is not None and train.synthetic.any():
        log.warning("the generator trains on real images only: ignoring %d synthetic ones", int(train.synthetic.sum()))
        data.sets["train"] = train = train.subset(~train.synthetic)
    dm = make_datamodule(cfg, data)

    def make_trainer(out: Path, epochs: int, monitor: str, mode: str):
        return build_trainer(cfg.train, out, max_epochs=epochs, monitor=monitor, mode=mode, ema_decay=None)

    fit_generator(data.spec, gp, dm, run_dir, make_trainer, gp.max_epochs or cfg.train.max_epochs,
                  train.class_counts(), resume, {"dataset": cfg.data.source, "seed": cfg.train.seed})
    return run_dir


def generator_dir(path: Path) -> Path:
    """``path`` itself when it holds model.json, else ``path/generator``."""
    path = Path(path)
    return path if (path / "model.json").is_file() else path / GENERATOR_DIR


def read_generator_meta(path: Path) -> dict:
    meta = generator_dir(path) / "model.json"
    if not meta.is_file():
        raise RunError(f"'{path}' has no trained generator ({meta} missing); train one with "
                       "`diffmed generator train` or resume it with --resume")
    return json.loads(meta.read_text())


def load_generator(path: Path, device: torch.device | str | None = None) -> ClassConditionalDiffusion:
    """The exported generator of a run (or generator) folder, frozen and in eval mode.

    Its ``backbone`` holds the exported (EMA) weights; parameters do not require grad, but gradients
    still flow to inputs and to ``embed_classes`` probabilities (D-Cube's cycle loss).
    """
    meta = read_generator_meta(path)
    counts = meta.get("class_counts")
    model = ClassConditionalDiffusion(TaskSpec.from_dict(meta["spec"]), meta["params"],
                                      None if counts is None else np.array(list(counts.values())), with_ema=False)
    weights = generator_dir(path) / "model.safetensors"
    try:
        model.backbone.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise RunError(f"weights {weights} do not match the generator described in its model.json "
                       f"(was it saved by another diffmed version?): {' '.join(first)}") from None
    return model.to(device or "cpu").eval().requires_grad_(False)
