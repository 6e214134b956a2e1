"""CLI commands of the generator, registered in cli.py as ``diffmed generator train``, ``diffmed generator eval``
and ``diffmed generate``.

Thin wrappers: they resolve options and call ``diffmed.diffusion`` / ``diffmed.evaluation.generation``.
Register them wrapped in ``cli.friendly`` so that user errors print as one message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

ParamOpt = typer.Option(None, "--param", "-p",
                        help="Generator option key=value (repeatable), e.g. -p backbone=uvit -p lambda_cont=0.5")
SetOpt = typer.Option(None, "--set", "-s",
                      help="Config override key.sub=value (repeatable), e.g. -s train.batch_size=64")


def train_generator_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (data, train settings)"),
    data: Optional[str] = typer.Option(None, help="Dataset: .npz, CSV, image folder or MedMNIST name"),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/<data>-generator-<time>)"),
    resume: Optional[Path] = typer.Option(None, help="Continue a killed generator run from its last checkpoint"),
    epochs: Optional[int] = None, seed: Optional[int] = None, image_size: Optional[int] = None,
    label_columns: Optional[str] = typer.Option(None, help="Label column of a CSV manifest"),
    devices: Optional[str] = None, strategy: Optional[str] = typer.Option(None, help="e.g. ddp"),
    param: Optional[list[str]] = ParamOpt, set_: Optional[list[str]] = SetOpt, verbose: bool = False,
) -> None:
    """Train a class-conditional diffusion generator on the training split; exports RUN/generator/."""
    from rich.markup import escape

    from diffmed.cli import _overrides, _setup_logging, console, default_run_dir
    from diffmed.config import load_config, parse_key_values
    from diffmed.diffusion.generative import GENERATOR_DIR, train_generator

    _setup_logging(verbose)
    if resume is not None:
        run_dir = train_generator(None, resume, None, resume=True)
    else:
        cfg = load_config(config, _overrides(data, None, epochs, seed, image_size, label_columns, None, devices,
                                             strategy, set_))
        run_dir = train_generator(cfg, out or default_run_dir(cfg.data.source, "generator"),
                                  parse_key_values(param, "--param"))
    console.print("[bold green]done[/] " + escape(f"generator in {Path(run_dir) / GENERATOR_DIR}; sample grids in "
                                                  f"{Path(run_dir) / 'logs' / 'samples'}"))


def generate_cmd(
    run_dir: Path = typer.Argument(..., help="A generator run folder (from `diffmed generator train`)"),
    out: Optional[Path] = typer.Option(None, help="Output folder (default RUN/synthetic); re-run to resume"),
    per_class: Optional[int] = typer.Option(None, help="Images per class"),
    balance_to: Optional[float] = typer.Option(None, help="Fill each class up to RATIO x the largest training class"),
    count: Optional[list[str]] = typer.Option(None, help="class=N (repeatable): explicit images per class"),
    steps: int = typer.Option(50, help="Sampling steps, evenly spread over the training chain"),
    sampler: str = typer.Option("ddim", help="ddim | ddpm | dpm"),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = plain conditional)"),
    eta: float = typer.Option(0.0, help="DDIM stochasticity (0 = deterministic)"),
    seed: int = 0, batch_size: int = typer.Option(64, help="Images per sampling batch"),
) -> None:
    """Generate class-targeted synthetic images and a manifest usable as data.synthetic."""
    from rich.markup import escape

    from diffmed.cli import console
    from diffmed.config import parse_key_values
    from diffmed.diffusion.generate import generate

    counts = parse_key_values(count, "--count") if count else None
    result = generate(run_dir, out or Path(run_dir) / "synthetic", per_class=per_class, balance_to=balance_to,
                      counts=counts, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                      batch_size=batch_size, eta=eta)
    console.print(f"[bold green]done[/] {result.written} new images ({result.kept} kept) at "
                  f"{result.images_per_second:.2f} images/s; manifest {escape(str(result.manifest))}\n"
                  + escape(f"  use it with: -s 'data.synthetic=[{result.manifest}]'"))


def eval_generator_cmd(
    run_dir: Path = typer.Argument(..., help="A generator run folder (from `diffmed generator train`)"),
    per_class: Optional[int] = typer.Option(None, help="Generated images per class (default 100 when sampling; "
                                                       "with --synthetic: all, or the first N)"),
    synthetic: Optional[Path] = typer.Option(None, help="Score this existing manifest (`diffmed generate`) instead "
                                                        "of sampling"),
    steps: int = typer.Option(50, help="Sampling steps"),
    sampler: str = typer.Option("ddim", help="ddim | ddpm | dpm"),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = plain conditional)"),
    seed: int = 0,
    features: str = typer.Option("auto", help="Feature space: auto (Inception-v3 when its weights are on disk, else "
                                              "domain) | domain (a classifier trained on the real training split) "
                                              "| inception"),
    feature_epochs: int = typer.Option(5, help="Training epochs of the domain feature extractor"),
    batch_size: int = typer.Option(64, help="Images per sampling batch"),
    out: Optional[Path] = typer.Option(None, help="Output JSON (default RUN/generation_eval.json)"),
) -> None:
    """Generation quality per class against the real training images: FID, KID, precision, recall, SSIM, PSNR."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from diffmed.cli import console
    from diffmed.evaluation.generation import GENERATION_EVAL, evaluate_generator

    report = evaluate_generator(run_dir, per_class=per_class, steps=steps, sampler=sampler, guidance=guidance,
                                seed=seed, synthetic=synthetic, features=features, feature_epochs=feature_epochs,
                                batch_size=batch_size, out=out)
    table = Table(title=escape(f"generation quality, feature space {report['feature_space']}"), title_justify="left",
                  box=box.SIMPLE_HEAD)
    for name in ("class", "real", "gen", "FID", "KID", "prec", "recall", "SSIM", "PSNR"):
        table.add_column(name, justify="left" if name == "class" else "right", no_wrap=name == "class")
    for name, m in [*report["per_class"].items(), ("overall", report["overall"])]:
        table.add_row(escape(name), str(m["n_real"]), str(m["n_fake"]), f"{m['fid']:.4g}", f"{m['kid']:.3g}",
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['ssim']:.3f}", f"{m['psnr']:.2f}")
    console.print(table)
    if report.get("not_evaluated"):
        console.print(escape(f"not evaluated (fewer than 2 generated images): {report['not_evaluated']}"))
    target = out or Path(report["generator_run"]) / f"{GENERATION_EVAL}.json"
    console.print("prec/recall: k-NN manifolds in that feature space; SSIM/PSNR (dB): to the nearest real image "
                  "of the class (SSIM near 1 flags copies)", highlight=False)
    console.print(f"report {escape(str(target))}", highlight=False)
