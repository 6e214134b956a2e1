"""The latent space of the latent diffusion transformer: a diffusers ``AutoencoderKL`` or pixel space.

Ukita et al. encode images with the Stable Diffusion VAE (z_0 = E(x)). diffmed offers three codecs
with one interface (``encode``/``decode``/``latent_shape``):

* a pretrained ``AutoencoderKL`` loaded from a local folder or ``.safetensors`` file, or a VAE folder
  written by ``diffmed vae train`` (``vae_path``);
* a small ``AutoencoderKL`` that diffmed trains itself on the unlabelled images (``train_vae``,
  ``diffmed vae train``: reconstruction + a small KL term, PSNR/SSIM reported on validation);
* pixel space (identity), the default at <= 32 px where a VAE compresses too little to pay off.

Latents are scaled to unit variance (``scale``, as the SD VAE's ``scaling_factor``) so the diffusion
schedule's signal-to-noise ratios mean the same in every space. Images are diffmed's normalised
tensors in [-1, 1] (TaskSpec mean = std = 0.5), the range AutoencoderKL expects.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import nn

from diffmed.errors import ConfigError, RunError

log = logging.getLogger("diffmed.diffusion.vae")
CODEC_WEIGHTS, CODEC_META = "codec.safetensors", "codec.json"
PIXEL_MAX_SIZE = 32
"""``autoencoder=auto`` uses pixel space up to this image size and a VAE above it."""
DATA_RANGE = 2.0
"""Normalised images span [-1, 1]: PSNR/SSIM use this range (equal to [0, 1] with range 1)."""


class LatentCodec(nn.Module):
    """Images (N, C, H, W) in [-1, 1] <-> diffusion latents z_0 (N, c, h, w) of about unit variance."""

    kind = "codec"

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready settings that rebuild this codec's architecture (weights travel separately)."""
        return {"kind": self.kind}

    @property
    def trainable(self) -> bool:
        """Whether diffmed must train this codec before it is used (a fresh VAE)."""
        return False


class PixelSpace(LatentCodec):
    """The identity "autoencoder": diffusion runs on the normalised pixels themselves."""

    kind = "pixel"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.channels, image_size, image_size)

    def describe(self) -> dict:
        return {"kind": self.kind, "channels": self.channels}


class VAECodec(LatentCodec):
    """A diffusers AutoencoderKL; encodes to the posterior mean (deterministic) times ``scale``.

    Grey images meet a 3-channel (e.g. Stable Diffusion) VAE by channel repetition on the way in and
    the channel mean on the way out.
    """

    kind = "vae"

    def __init__(self, vae: AutoencoderKL, image_channels: int, source: str = "trained") -> None:
        super().__init__()
        vae_in = int(vae.config.in_channels)
        if vae_in != image_channels and not (vae_in == 3 and image_channels == 1):
            raise ConfigError(f"the VAE takes {vae_in}-channel images but the data has {image_channels}; "
                              "set data.channels to match or use another VAE")
        self.vae, self.image_channels, self.source = vae, image_channels, source
        self.register_buffer("scale", torch.tensor(float(vae.config.scaling_factor)))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.vae.config.in_channels, -1, -1) if x.shape[1] != self.vae.config.in_channels else x

    def _from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True) if self.image_channels == 1 and x.shape[1] != 1 else x

    def posterior(self, x: torch.Tensor):
        return self.vae.encode(self._to_vae(x)).latent_dist

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x).mode() * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._from_vae(self.vae.decode(z / self.scale).sample)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ConfigError(f"data.image_size={image_size} is not a multiple of the VAE's downsampling "
                              f"factor {self.downsample}; pick a size divisible by it")
        side = image_size // self.downsample
        return (int(self.vae.config.latent_channels), side, side)

    def describe(self) -> dict:
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {"kind": self.kind, "image_channels": self.image_channels, "source": self.source, "vae": config}

    @property
    def trainable(self) -> bool:
        return self.source == "trained"


def small_vae(channels: int, image_size: int, downsample: int = 4, width: int = 32,
              latent_channels: int = 4) -> AutoencoderKL:
    """A compact AutoencoderKL (one resnet layer per level) for diffmed to train on the user's images."""
    levels = int(math.log2(downsample)) + 1
    if 2 ** (levels - 1) != downsample:
        raise ConfigError(f"method.params.vae_downsample={downsample} must be a power of two (1, 2, 4, 8)")
    if image_size % downsample:
        raise ConfigError(f"data.image_size={image_size} is not divisible by method.params.vae_downsample={downsample}")
    widths = tuple(width * min(2 ** i, 4) for i in range(levels))
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=widths, layers_per_block=1, norm_num_groups=min(8, width),
                         sample_size=image_size, scaling_factor=1.0)


def load_pretrained_vae(path: str | Path) -> AutoencoderKL:
    """A local AutoencoderKL: a diffusers folder (config.json + weights) or a ``.safetensors`` file.

    A single file is read with its architecture from a ``config.json`` beside it when present, else
    through diffusers' single-file loader (original Stable Diffusion checkpoints), never from a hub.
    """
    path = Path(path)
    if path.is_dir():
        try:
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"method.params.vae_path '{path}' is not a diffusers AutoencoderKL folder ({err})") from None
    if path.is_file() and path.suffix == ".safetensors":
        config = path.with_name("config.json")
        if config.is_file():
            vae = AutoencoderKL.from_config(json.loads(config.read_text()))
            vae.load_state_dict(load_file(str(path)))
            return vae
        try:
            return AutoencoderKL.from_single_file(str(path), local_files_only=True)
        except Exception as err:  # diffusers raises several types for unreadable single files
            raise ConfigError(f"could not read VAE weights '{path}' ({err}); put the diffusers config.json "
                              "beside the file or pass the model folder") from None
    raise ConfigError(f"method.params.vae_path '{path}' not found (expected a folder or a .safetensors file)")


def build_codec(kind: str, channels: int, image_size: int, vae_path: str | None = None, downsample: int = 4,
                width: int = 32, latent_channels: int = 4) -> LatentCodec:
    """``auto``: pixel space at <= 32 px without a given VAE, else a VAE (``vae_path`` or a fresh small one)."""
    if kind == "auto":
        kind = "pixel" if image_size <= PIXEL_MAX_SIZE and vae_path is None else "vae"
    if kind == "pixel":
        return PixelSpace(channels)
    if kind != "vae":
        raise ConfigError(f"method.params.autoencoder='{kind}' is unknown; choose auto, pixel or vae")
    if vae_path:
        folder = diffmed_codec_folder(vae_path)
        codec = load_codec(folder) if folder else VAECodec(load_pretrained_vae(vae_path), channels)
        codec.source = f"pretrained:{vae_path}"
        return codec
    return VAECodec(small_vae(channels, image_size, downsample, width, latent_channels), channels)


def diffmed_codec_folder(path: str | Path) -> Path | None:
    """The folder of a VAE trained by ``diffmed vae train`` (``codec.json`` in it or in its ``model/``)."""
    for folder in (Path(path), Path(path) / "model"):
        if (folder / CODEC_META).is_file():
            return folder
    return None


def codec_from_description(desc: dict) -> LatentCodec:
    """Rebuild a codec's architecture from ``describe()`` (then load its weights)."""
    if desc["kind"] == "pixel":
        return PixelSpace(int(desc["channels"]))
    return VAECodec(AutoencoderKL.from_config(desc["vae"]), int(desc["image_channels"]), desc.get("source", "trained"))


def save_codec(codec: LatentCodec, folder: Path, extra: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}, str(folder / CODEC_WEIGHTS))
    (folder / CODEC_META).write_text(json.dumps({**codec.describe(), **(extra or {})}, indent=2))


def load_codec(folder: Path) -> LatentCodec:
    meta = folder / CODEC_META
    if not meta.is_file():
        raise RunError(f"'{folder}' holds no trained autoencoder ({CODEC_META} missing)")
    codec = codec_from_description(json.loads(meta.read_text()))
    codec.load_state_dict(load_file(str(folder / CODEC_WEIGHTS)))
    return codec


@torch.no_grad()
def fit_latent_scale(codec: VAECodec, batches: Iterable[dict], max_batches: int = 20) -> float:
    """Set ``scale`` so encoded training latents have unit standard deviation (as SD's 0.18215)."""
    codec.scale.fill_(1.0)
    device = codec.scale.device
    zs = [codec.encode(b["image"].to(device)).float().flatten() for _, b in zip(range(max_batches), batches)]
    std = float(torch.cat(zs).std())
    codec.scale.fill_(1.0 / max(std, 1e-6))
    return 1.0 / max(std, 1e-6)


def reconstruction_scores(x: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of reconstructions of normalised images (torchmetrics, range [-1, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    recon = recon.clamp(-1, 1).float()
    return {"psnr": float(peak_signal_noise_ratio(recon, x.float(), data_range=DATA_RANGE)),
            "ssim": float(structural_similarity_index_measure(recon, x.float(), data_range=DATA_RANGE))}


@torch.no_grad()
def reconstruction_metrics(codec: LatentCodec, batches: Iterable[dict], max_batches: int | None = None) -> dict:
    """Mean PSNR/SSIM of encode -> decode over a loader's images."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    device = next(iter(codec.buffers()), torch.zeros(())).device
    psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=DATA_RANGE).to(device)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch["image"].to(device)
        recon = codec.decode(codec.encode(x)).clamp(-1, 1)
        psnr.update(recon, x)
        ssim.update(recon, x)
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute())}


class VAETrainer(L.LightningModule):
    """Trains a VAECodec: per-pixel MSE + ``kl_weight`` x KL per pixel; logs val PSNR/SSIM."""

    def __init__(self, codec: VAECodec, lr: float = 1e-3, kl_weight: float = 1e-4) -> None:
        super().__init__()
        self.codec, self.lr, self.kl_weight = codec, lr, kl_weight
        self._val: list[dict[str, float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        post = self.codec.posterior(x)
        recon = self.codec._from_vae(self.codec.vae.decode(post.sample()).sample)
        rec = F.mse_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * kl
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        scores = reconstruction_scores(x, self.codec._from_vae(self.codec.vae.decode(self.codec.posterior(x).mode()).sample))
        self._val.append({**scores, "n": len(x)})

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        n = sum(v["n"] for v in self._val)
        for key in ("psnr", "ssim"):
            self.log(f"val/{key}", sum(v[key] * v["n"] for v in self._val) / n, prog_bar=True)
        self._val.clear()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.codec.parameters(), lr=self.lr)


def fit_vae(codec: VAECodec, make_trainer, stage_dir: Path, train_loader, val_loader, epochs: int,
            lr: float = 1e-3, kl_weight: float = 1e-4, resume: bool = False) -> dict:
    """Train ``codec`` in ``stage_dir`` (best epoch by val PSNR), fit its latent scale, save and score it."""
    from diffmed.engine.checkpoint import best_checkpoint_state
    from diffmed.engine.trainer import CKPT_DIR

    module = VAETrainer(codec, lr, kl_weight)
    trainer = make_trainer(stage_dir, epochs, "val/psnr", "max")
    last = stage_dir / CKPT_DIR / "last.ckpt"
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=last if resume and last.is_file() else None, weights_only=True)
    best = stage_dir / CKPT_DIR / "best.ckpt"
    module.load_state_dict(best_checkpoint_state(best if best.is_file() else last))
    codec.eval()
    scale = fit_latent_scale(codec, train_loader)
    scores = reconstruction_metrics(codec, val_loader)
    log.info("VAE: val PSNR %.2f dB, SSIM %.4f, latent scale %.4f", scores["psnr"], scores["ssim"], scale)
    save_codec(codec, stage_dir / "model", {"val_psnr": scores["psnr"], "val_ssim": scores["ssim"], "scale": scale})
    return scores


def train_vae(cfg, out_dir: Path, epochs: int = 20, downsample: int = 4, width: int = 32, latent_channels: int = 4,
              lr: float = 1e-3, kl_weight: float = 1e-4, resume: bool = False) -> dict:
    """``diffmed vae train``: a small VAE on the training split's images (labels unused), saved in
    ``out_dir/model`` with its validation PSNR/SSIM; pass ``out_dir`` as ``method.params.vae_path``."""
    from diffmed.engine.data import make_datamodule, prepare_data
    from diffmed.engine.seed import seed_all
    from diffmed.engine.trainer import build_trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.train.seed)
    data = prepare_data(cfg, out_dir)
    dm = make_datamodule(cfg, data)
    codec = build_codec("vae", data.spec.channels, data.spec.image_size, None, downsample, width, latent_channels)

    def make(stage_dir: Path, max_epochs: int, monitor: str | None = None, mode: str | None = None):
        return build_trainer(cfg.train, stage_dir, max_epochs=max_epochs, monitor=monitor, mode=mode)

    return fit_vae(codec, make, out_dir, dm.train_dataloader(), dm.val_dataloader(), epochs, lr, kl_weight, resume)
