"""``diffmed augment``: an offline augmented training set, registered in cli.py (wrapped in ``cli.friendly``).

A thin wrapper: it resolves the data config like ``diffmed train`` and calls
:func:`diffmed.augment.strategies.augment_to_manifest`.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

SetOpt = typer.Option(None, "--set", "-s", help="Config override key.sub=value (repeatable), as for `diffmed train`, "
                                                "e.g. -s data.image_size=64")


def train_command(config: Path | None, data: str | None, overrides: list[str], manifest: Path) -> str:
    """The ``diffmed train`` command that trains on the same data plus the augmented images of ``manifest``."""
    args = ["diffmed", "train"]
    if config is not None:
        args += ["--config", str(config)]
    if data is not None:
        args += ["--data", data]
    for item in overrides:
        args += ["-s", item]
    return shlex.join(args + ["-s", f"data.synthetic=[{manifest}]"])


def augment_cmd(
    data: Optional[str] = typer.Option(None, help="Dataset: .npz, CSV, image folder or MedMNIST name"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (its data section is used)"),
    strategy: str = typer.Option("unbalanced", help="unbalanced | balanced | misclassified"),
    producer: str = typer.Option("traditional", help="traditional | diffusion | mixed (each image one or the other)"),
    generator: Optional[Path] = typer.Option(None, help="Generator run folder (`diffmed generator train`): "
                                                        "needed by --producer diffusion and mixed"),
    model: Optional[Path] = typer.Option(None, help="Trained classifier run folder (`diffmed train`): needed by "
                                                    "--strategy misclassified"),
    methods: Optional[str] = typer.Option(None, help="Comma-separated traditional methods (rotation, flipping, "
                                                     "translation, shearing, cropping, noise, blurring, coloring); "
                                                     "default: the thesis's combined policy"),
    k: Optional[int] = typer.Option(None, help="New images per source image (unbalanced: per minority image, "
                                               "default 11; misclassified: per selected image, default 11)"),
    seed: int = 0,
    steps: int = typer.Option(50, help="Diffusion sampling steps"),
    sampler: str = typer.Option("ddim", help="Diffusion sampler: ddim | ddpm | dpm"),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale"),
    out: Optional[Path] = typer.Option(None, help="Output folder (default "
                                                  "runs/<data>-augment-<strategy>-<producer>-<time>)"),
    set_: Optional[list[str]] = SetOpt, verbose: bool = False,
) -> None:
    """Build an offline augmented training set (images + manifest CSV for data.synthetic); val/test untouched."""
    from rich.markup import escape

    from diffmed.augment.strategies import augment_to_manifest
    from diffmed.cli import _overrides, _setup_logging, console, default_run_dir
    from diffmed.config import load_config

    _setup_logging(verbose)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    cfg = load_config(config, _overrides(data, None, None, None, None, None, None, None, None, set_))
    out = out or default_run_dir(cfg.data.source, f"augment-{strategy}-{producer}")
    result = augment_to_manifest(cfg, out, strategy, producer, methods=method_list, k=k, seed=seed,
                                 generator_run=generator, model_run=model,
                                 generate_options={"steps": steps, "sampler": sampler, "guidance": guidance})
    added = sum(result.added.values())
    lines = [f"[bold green]done[/] {added} new training images; manifest {escape(str(result.manifest))}"]
    if result.selection is not None:
        lines.append(f"  misclassified by the model: {result.selection.misclassified}; near the boundary, augmented: "
                     f"{len(result.selection.rows)}")
    width = max(len(c) for c in result.added)
    lines += [escape(f"  {c:<{width}}  {result.real_counts[c]:>6} real  + {n:>6} new") for c, n in result.added.items()]
    if added == 0:
        lines.append("[yellow]nothing to add[/]: the strategy plans no new image for this training set (e.g. "
                     "balanced classes, or no misclassified image near the boundary); train on the real images")
        console.print("\n".join(lines), highlight=False)
        return
    lines.append("train on real + augmented images with:")
    console.print("\n".join(lines), highlight=False)
    typer.echo(train_command(config, data, list(set_ or []), result.manifest))
