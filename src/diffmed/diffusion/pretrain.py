"""Self-supervised pre-training of the latent DiT on unlabelled images (Ukita et al., section 3.2).

Pre-training minimises Eq. 2, ||eps - g_theta(z_t, r, t)||^2 with r = f_phi(z_0) trained jointly
(``mode=representation``) or without r (``mode=unconditional``), on every training image with its
label ignored. Downstream tuning then carries the shared weights into a class-conditioned DiT
(``dit.to_class_conditional``). A method's ``fit_stages`` calls :func:`pretrain_stage`; ``diffmed
pretrain`` (:func:`pretrain`) runs only those stages, on the whole training split, so that several
tuning runs (seeds, label fractions) can share one pre-trained model via ``pretrained_run``.

Stage folders inside a run: ``stages/vae`` (when diffmed trains the VAE) and ``stages/pretrain``,
each with Lightning checkpoints (resumable), CSV/TensorBoard logs (the loss curve) and ``model/``
(safetensors weights + JSON settings). A finished stage is never trained again.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from diffmed.diffusion.dit import DiTConfig, LatentDiT, dit_config
from diffmed.diffusion.vae import LatentCodec, build_codec, fit_vae, load_codec, save_codec
from diffmed.errors import ConfigError, RunError

log = logging.getLogger("diffmed.diffusion.pretrain")
PRETRAIN_STAGE, VAE_STAGE = "pretrain", "vae"
DIT_WEIGHTS, PRETRAIN_META = "dit.safetensors", "pretrain.json"


class PretrainParams(BaseModel):
    """Latent space, DiT and schedule settings shared by pre-training and every method built on it."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["unconditional", "representation"] = "representation"
    """Pre-training conditioning: the paper's representation-conditioned DiT or its unconditional ablation."""
    size: Literal["tiny", "S", "B"] = "tiny"
    """DiT preset: tiny (CPU, 28 px), S or B (the paper's model; GPU)."""
    patch_size: int | None = None
    """Default: 4 for tiny, 2 for S/B (the paper's)."""
    rep_dim: int | None = None
    """Width of r (default: the DiT width)."""
    rep_depth: int | None = None
    """ViT encoder blocks (default: half the DiT's)."""
    autoencoder: Literal["auto", "pixel", "vae"] = "auto"
    """auto: pixel space at <= 32 px unless vae_path is given, else a VAE."""
    vae_path: str | None = None
    """Local VAE: a diffusers AutoencoderKL folder, a .safetensors file, or a `diffmed vae train` folder.
    Unset with autoencoder=vae: diffmed trains a small VAE on the unlabelled images first."""
    vae_downsample: int = 4
    vae_width: int = 32
    vae_latent_channels: int = 4
    vae_epochs: int = 20
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    pretrain_epochs: int = 50
    pretrain_lr: float = 1e-4
    """AdamW, constant (the paper's and DiT's 1e-4)."""
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    pretrained_run: str | None = None
    """A run (or `diffmed pretrain` folder) whose pre-trained DiT to tune instead of pre-training here."""


@dataclass
class Pretrained:
    codec: LatentCodec
    dit: LatentDiT
    meta: dict


def make_scheduler(params: PretrainParams) -> DDPMScheduler:
    """The DDPM forward process (DiT's linear betas 1e-4..0.02 over 1000 steps by default)."""
    return DDPMScheduler(num_train_timesteps=params.num_train_timesteps, beta_schedule=params.beta_schedule)


def schedule_settings(params: PretrainParams) -> dict:
    return {"num_train_timesteps": params.num_train_timesteps, "beta_schedule": params.beta_schedule}


def build_dit(params: PretrainParams, codec: LatentCodec, image_size: int, mode: str, num_classes: int = 0) -> LatentDiT:
    c, side, _ = codec.latent_shape(image_size)
    return LatentDiT(dit_config(params.size, c, side, mode, params.patch_size, num_classes, params.rep_dim,
                                params.rep_depth))


def build_codec_for(params: PretrainParams, channels: int, image_size: int) -> LatentCodec:
    return build_codec(params.autoencoder, channels, image_size, params.vae_path, params.vae_downsample,
                       params.vae_width, params.vae_latent_channels)


def ddpm_loss(dit: LatentDiT, scheduler: DDPMScheduler, z0: torch.Tensor, y: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2: MSE between the noise and its prediction at a uniform random timestep (per-sample weights optional).

    Training noise and timesteps come from the global RNG, which the engine re-seeds every epoch.
    """
    noise = torch.randn_like(z0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), device=z0.device)
    z_t = scheduler.add_noise(z0, noise, t)
    pred = dit(z_t, t, y=y, z0=z0 if dit.cfg.mode == "representation" else None)
    per = (pred.float() - noise.float()).pow(2).flatten(1).mean(1)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum().clamp_min(1e-8)


class DiffusionPretrainer(L.LightningModule):
    """Lightning module of pre-training: frozen codec, DiT (+ jointly trained f_phi) on Eq. 2."""

    def __init__(self, codec: LatentCodec, dit: LatentDiT, scheduler: DDPMScheduler, lr: float = 1e-4) -> None:
        super().__init__()
        self.codec, self.dit, self.ddpm, self.lr = codec, dit, scheduler, lr
        self.codec.requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.codec.eval()
        with torch.no_grad():
            z0 = self.codec.encode(batch["image"])
        loss = ddpm_loss(self.dit, self.ddpm, z0)  # labels unused: self-supervised
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training loss became {loss.item()}; lower method.params.pretrain_lr")
        n = len(z0)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.dit.parameters(), lr=self.lr, weight_decay=0.0)


# ------------------------------------------------------------------------------------ data
def unlabelled_loader(dm) -> DataLoader:
    """The images to pre-train on: ``sets["unlabelled"]`` when the engine provides one (every training
    image before ``data.train_fraction``), else the training split; labels are never read."""
    if "unlabelled" not in dm.sets:
        return dm.train_dataloader()
    from diffmed.data.dataset import EpochSampler

    sampler = EpochSampler(len(dm.sets["unlabelled"]), dm.seed)
    return DataLoader(dm.dataset("unlabelled", augment=True), batch_size=dm.batch_size, sampler=sampler,
                      num_workers=dm.num_workers, generator=sampler.loader_generator,
                      pin_memory=torch.cuda.is_available())


# ------------------------------------------------------------------------------------ saved models
def save_pretrained(folder: Path, codec: LatentCodec, dit: LatentDiT, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_codec(codec, folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in dit.state_dict().items()}, str(folder / DIT_WEIGHTS))
    (folder / PRETRAIN_META).write_text(json.dumps({**meta, "dit": dit.cfg.to_dict()}, indent=2))


def pretrained_folder(path: str | Path) -> Path:
    """The model folder of a pre-training: given itself, its stage folder, or a run holding the stage."""
    path = Path(path)
    for folder in (path, path / "model", path / "stages" / PRETRAIN_STAGE / "model"):
        if (folder / PRETRAIN_META).is_file():
            return folder
    raise ConfigError(f"method.params.pretrained_run '{path}' holds no pre-trained DiT "
                      f"({PRETRAIN_META} not found); run `diffmed pretrain` first")


def load_pretrained(path: str | Path) -> Pretrained:
    folder = pretrained_folder(path)
    meta = json.loads((folder / PRETRAIN_META).read_text())
    dit = LatentDiT(DiTConfig.from_dict(meta["dit"]))
    dit.load_state_dict(load_file(str(folder / DIT_WEIGHTS)))
    return Pretrained(load_codec(folder), dit, meta)


def _architecture(codec: LatentCodec) -> dict:
    """A codec's settings as JSON would store them (tuples become lists), without where it came from."""
    desc = json.loads(json.dumps(codec.describe()))
    desc.pop("source", None)
    return desc


def check_compatible(pre: Pretrained, params: PretrainParams, codec: LatentCodec, where: str) -> None:
    """Tuning must use the pre-training's latent space and noise schedule; say which option differs."""
    if pre.codec.kind != codec.kind:
        raise ConfigError(f"{where} was pre-trained with autoencoder '{pre.codec.kind}' but this run uses "
                          f"'{codec.kind}'; set method.params.autoencoder={pre.codec.kind}")
    ours, theirs = _architecture(codec), _architecture(pre.codec)
    if ours != theirs:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise ConfigError(f"{where} used another {codec.kind} latent space (differs in {diff}); use the same "
                          "vae_path / vae_downsample / vae_width / vae_latent_channels as in pre-training")
    theirs, ours = pre.meta.get("schedule", {}), schedule_settings(params)
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        raise ConfigError(f"{where} used another noise schedule (pre-trained vs now: {diff}); set the same "
                          "method.params.num_train_timesteps / beta_schedule")


# ------------------------------------------------------------------------------------ stages
def obtain_codec(params: PretrainParams, spec, ctx) -> LatentCodec:
    """The latent codec: pixel space, a given VAE, or a VAE trained here in ``stages/vae`` (once)."""
    codec = build_codec_for(params, spec.channels, spec.image_size)
    if not codec.trainable:
        return codec
    stage = Path(ctx.run_dir) / "stages" / VAE_STAGE
    if (stage / "model" / "codec.json").is_file():
        return load_codec(stage / "model")
    dm = ctx.datamodule
    fit_vae(codec, ctx.make_trainer, stage, unlabelled_loader(dm), dm.val_dataloader(), params.vae_epochs,
            params.vae_lr, params.vae_kl_weight, resume=ctx.resume)
    return codec


def pretrain_stage(params: PretrainParams, spec, ctx) -> Pretrained:
    """The pre-trained DiT: from ``pretrained_run``, from a finished stage, or trained now (Eq. 2)."""
    if params.pretrained_run:
        return load_pretrained(params.pretrained_run)
    stage = Path(ctx.run_dir) / "stages" / PRETRAIN_STAGE
    if (stage / "model" / PRETRAIN_META).is_file():
        log.info("pre-training already finished in %s: reusing it", stage)
        return load_pretrained(stage)
    from diffmed.engine.trainer import CKPT_DIR

    codec = obtain_codec(params, spec, ctx)
    dit = build_dit(params, codec, spec.image_size, params.mode)
    module = DiffusionPretrainer(codec, dit, make_scheduler(params), params.pretrain_lr)
    loader = unlabelled_loader(ctx.datamodule)
    trainer = ctx.make_trainer(stage, params.pretrain_epochs, "train/loss", "min")
    last = stage / CKPT_DIR / "last.ckpt"
    trainer.fit(module, train_dataloaders=loader, ckpt_path=last if ctx.resume and last.is_file() else None,
                weights_only=True)
    meta = {"mode": params.mode, "schedule": schedule_settings(params), "epochs": params.pretrain_epochs,
            "images": len(loader.dataset), "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            "image_size": spec.image_size, "channels": spec.channels}
    if trainer.is_global_zero:
        save_pretrained(stage / "model", codec.cpu(), dit.cpu(), meta)
    trainer.strategy.barrier()
    return Pretrained(codec.cpu(), dit.cpu(), meta)


# ------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample(dit: LatentDiT, codec: LatentCodec, scheduler: DDPMScheduler, n: int, image_size: int, steps: int = 50,
           generator: torch.Generator | None = None, y: torch.Tensor | None = None, r: torch.Tensor | None = None,
           batch_size: int = 256) -> torch.Tensor:
    """n images in [-1, 1] by deterministic DDIM (eta = 0) from seeded noise; ``y`` or ``r`` condition them."""
    device = next(dit.parameters()).device
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    shape = codec.latent_shape(image_size)
    noise = torch.randn((n, *shape), generator=generator).to(device)
    out = []
    for s in range(0, n, batch_size):
        z = noise[s : s + batch_size]
        cond = {"y": None if y is None else y[s : s + batch_size].to(device),
                "r": None if r is None else r[s : s + batch_size].to(device)}
        for t in ddim.timesteps:
            z = ddim.step(dit(z, t.to(device), **cond), t, z).prev_sample
        out.append(codec.decode(z).clamp(-1, 1).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------ `diffmed pretrain`
def _trainer_factory(cfg):
    from diffmed.engine.trainer import build_trainer

    def make(stage_dir: Path, max_epochs: int, monitor: str | None = None, mode: str | None = None):
        return build_trainer(cfg.train, stage_dir, max_epochs=max_epochs, monitor=monitor, mode=mode)
    return make


def pretrain(cfg, out_dir: Path, resume: bool = False) -> Path:
    """Run the pre-training stages of ``cfg.method`` on every training image (labels unused).

    ``data.train_fraction`` is ignored here (it limits the *labelled* images of tuning runs); val/test
    images are never seen. Returns ``out_dir``; pass it to tuning runs as ``method.params.pretrained_run``.
    """
    from diffmed.config import load_config, save_config
    from diffmed.engine.data import make_datamodule, prepare_data
    from diffmed.engine.seed import seed_all
    from diffmed.methods import ClassifierMethod, StageContext, create_method

    out_dir = Path(out_dir)
    config_file = out_dir / "config.yaml"
    if resume:
        if not config_file.is_file():
            raise RunError(f"cannot resume '{out_dir}': it has no config.yaml; start it with `diffmed pretrain`")
        cfg = load_config(config_file)
    elif config_file.is_file():
        raise RunError(f"'{out_dir}' already holds a pre-training; choose another --out or add --resume")
    if cfg.method.params.get("pretrained_run"):
        raise ConfigError("method.params.pretrained_run is set: that model is already pre-trained")
    if cfg.data.train_fraction < 1.0:
        log.warning("data.train_fraction=%s applies to labelled tuning only: pre-training uses every "
                    "training image", cfg.data.train_fraction)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_fraction": 1.0})})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_file)
    seed_all(cfg.train.seed)
    data = prepare_data(cfg, out_dir)
    method = create_method(cfg.method.name, data.spec, cfg.method.params, cfg.optim, cfg.train.max_epochs,
                           data.sets["train"].class_counts())
    if type(method).fit_stages is ClassifierMethod.fit_stages:
        raise ConfigError(f"method '{cfg.method.name}' has no pre-training stage; use diffusion_classifier, "
                          "dit_probe or simclr")
    dm = make_datamodule(cfg, data)
    method.fit_stages(StageContext(dm, out_dir, _trainer_factory(cfg), resume))
    return out_dir
