"""``diffmed dcube analyze RUN``: the KS Gaussianity analysis of a generator's blocks (D-Cube Fig. 2).

Register in cli.py with ``cli_dcube.register(app)`` (adds the ``dcube`` group), or add ``analyze_cmd``
to a group of your own wrapped in ``cli.friendly``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _ints(text: str, option: str) -> list[int]:
    from diffmed.errors import ConfigError

    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{option} '{text}' must be comma-separated integers, e.g. 0,100,500") from None


def analyze_cmd(
    run: Path = typer.Argument(..., help="A generator run (`diffmed generator train`) or a D-Cube run folder"),
    out: Optional[Path] = typer.Option(None, help="Output folder (default RUN/gaussianity)"),
    images: int = typer.Option(256, help="Real training images analysed (seeded choice)"),
    timesteps: str = typer.Option("0,50,100,200,300,500,700,900", help="Timestep grid of the plot, comma-separated"),
    timestep: Optional[int] = typer.Option(None, help="Timestep of the selection (default: the D-Cube run's, "
                                                      "else 100)"),
    input: Optional[str] = typer.Option(None, help="x0 (clean image) or xt (noised to the timestep)"),
    alpha: float = typer.Option(0.05, help="Layers with mean KS p-value below alpha are selected"),
    top_k: Optional[int] = typer.Option(None, help="Select the k least Gaussian layers instead"),
    reduce: str = typer.Option("pvalue", help="pvalue (mean of per-image p-values) or feature (batch-mean map)"),
    values: int = typer.Option(1024, help="Values per KS test (seeded subsample; 0 = all)"),
    layers: Optional[str] = typer.Option(None, help="Only these blocks, comma-separated"),
    seed: int = 0, batch_size: int = 64,
) -> None:
    """KS p-value of every block's output per timestep: plot, CSV/markdown table and the layer selection."""
    from rich.markup import escape

    from diffmed.cli import console
    from diffmed.methods.dcube.gaussianity import analyze_run

    _, selection, paths = analyze_run(
        run, out, images, _ints(timesteps, "--timesteps"), timestep, input, alpha, top_k,
        reduce,  # type: ignore[arg-type]
        values or None, seed, batch_size, layers.split(",") if layers else None)
    console.print(f"[bold green]done[/] t={selection.timestep}: best {selection.best}, worst {selection.worst}"
                  + (f" ({selection.note})" if selection.note else ""))
    console.print(escape("  " + "\n  ".join(f"{k}: {v}" for k, v in paths.items())))
    console.print(escape(f"  train with: -s method.params.layers=[{','.join(selection.best)}]"))


def register(app: typer.Typer) -> None:
    """Add the ``dcube`` command group (``diffmed dcube analyze``) to the diffmed app."""
    from diffmed.cli import friendly

    dcube_app = typer.Typer(help="D-Cube: diffusion hyper-feature analysis.", no_args_is_help=True)
    dcube_app.command("analyze")(friendly(analyze_cmd))
    app.add_typer(dcube_app, name="dcube")
