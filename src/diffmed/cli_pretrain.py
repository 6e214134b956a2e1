"""CLI commands of self-supervised pre-training: ``diffmed pretrain`` and ``diffmed vae train``.

``cli.py`` calls :func:`register` once, after its own helpers are defined.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

def _pairs(pairs: dict[str, object], extra: list[str] | None) -> list[str]:
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + list(extra or [])


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` and the ``vae`` group to the diffmed app."""
    from diffmed.cli import SetOpt, _setup_logging, console, friendly

    vae_app = typer.Typer(help="Latent autoencoders for the latent diffusion transformer.", no_args_is_help=True)

    @app.command("pretrain")
    @friendly
    def pretrain(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (defaults for every key)"),
        data: Optional[str] = typer.Option(None, help="Dataset: .npz, CSV, image folder or MedMNIST name"),
        method: str = typer.Option("diffusion_classifier",
                                   help="Method whose pre-training stages to run: diffusion_classifier, dit_probe, simclr"),
        mode: Optional[str] = typer.Option(None, help="DiT conditioning: representation (default) or unconditional"),
        size: Optional[str] = typer.Option(None, help="DiT preset: tiny, S or B"),
        epochs: Optional[int] = typer.Option(None, help="Pre-training epochs (method.params.pretrain_epochs)"),
        out: Path = typer.Option(..., help="Folder for the pre-trained model; pass it as method.params.pretrained_run"),
        resume: bool = typer.Option(False, help="Continue a killed pre-training in --out"),
        seed: Optional[int] = None, image_size: Optional[int] = None,
        set_: Optional[list[str]] = SetOpt, verbose: bool = False,
    ) -> None:
        """Pre-train on every training image without labels (val/test never seen)."""
        from diffmed.config import load_config
        from diffmed.diffusion.pretrain import pretrain as run_pretrain

        _setup_logging(verbose)
        cfg = load_config(config, _pairs({"data.source": data, "method.name": method, "train.seed": seed,
                                          "data.image_size": image_size, "method.params.mode": mode,
                                          "method.params.size": size, "method.params.pretrain_epochs": epochs}, set_))
        done = run_pretrain(cfg, out, resume=resume)
        console.print(f"[bold green]done[/] {done}\n  tune with: -s method.params.pretrained_run={done}")

    @vae_app.command("train")
    @friendly
    def vae_train(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (data and train sections)"),
        data: Optional[str] = typer.Option(None, help="Dataset: .npz, CSV, image folder or MedMNIST name"),
        out: Path = typer.Option(..., help="Folder for the VAE; pass it as method.params.vae_path"),
        epochs: int = 20, downsample: int = typer.Option(4, help="Spatial downsampling (power of two)"),
        width: int = 32, latent_channels: int = 4, kl_weight: float = 1e-4, lr: float = 1e-3,
        resume: bool = False, image_size: Optional[int] = None, seed: Optional[int] = None,
        set_: Optional[list[str]] = SetOpt, verbose: bool = False,
    ) -> None:
        """Train a small AutoencoderKL on the training images (labels unused); reports val PSNR/SSIM."""
        from diffmed.config import load_config
        from diffmed.diffusion.vae import train_vae

        _setup_logging(verbose)
        cfg = load_config(config, _pairs({"data.source": data, "data.image_size": image_size, "train.seed": seed}, set_))
        scores = train_vae(cfg, out, epochs, downsample, width, latent_channels, lr, kl_weight, resume)
        console.print(f"[bold green]done[/] {out}: val PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}\n"
                      f"  use with: -s method.params.autoencoder=vae -s method.params.vae_path={out}")

    app.add_typer(vae_app, name="vae")
