"""The ``diffmed`` command line: thin wrappers that resolve the config and call library functions."""
from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from diffmed.errors import DiffmedError

app = typer.Typer(help="Diffusion models for medical image classification.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Config override key.sub=value (repeatable), e.g. -s train.max_epochs=5")


def friendly(fn: Callable) -> Callable:
    """Print diffmed errors as one clear message (exit 2) instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffmedError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _overrides(data: str | None, method: str | None, epochs: int | None, seed: int | None, image_size: int | None,
               label_columns: str | None, group_column: str | None, devices: str | None, strategy: str | None,
               extra: list[str] | None) -> list[str]:
    pairs = {"data.source": data, "method.name": method, "train.max_epochs": epochs, "train.seed": seed,
             "data.image_size": image_size, "data.group_column": group_column, "train.devices": devices,
             "train.strategy": strategy}
    out = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    if label_columns:
        out.append(f"data.label_columns=[{label_columns}]")
    return out + list(extra or [])


def default_run_dir(source: str, method: str) -> Path:
    stem = Path(source).stem or Path(source).name
    return Path("runs") / f"{stem}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # Lightning's start-up banners (GPU/TPU available, tips) are noise for a CLI user
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


@app.command()
@friendly
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (defaults for every key)"),
    data: Optional[str] = typer.Option(None, help="Dataset: .npz, CSV, image folder or MedMNIST name"),
    method: Optional[str] = typer.Option(None, help="Registered method (see `diffmed methods`)"),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/<data>-<method>-<time>)"),
    resume: Optional[Path] = typer.Option(None, help="Continue a killed run from its last checkpoint"),
    epochs: Optional[int] = None, seed: Optional[int] = None, image_size: Optional[int] = None,
    label_columns: Optional[str] = typer.Option(None, help="Comma-separated label column(s) of a CSV manifest"),
    group_column: Optional[str] = typer.Option(None, help="Patient/lesion id column: splits keep groups together"),
    devices: Optional[str] = None, strategy: Optional[str] = typer.Option(None, help="e.g. ddp"),
    set_: Optional[list[str]] = SetOpt, verbose: bool = False,
) -> None:
    """Train a method; writes checkpoints, model, metrics, predictions and a report to the run folder."""
    from diffmed.config import load_config
    from diffmed.engine.run import train as run_train

    _setup_logging(verbose)
    if resume is not None:
        result = run_train(None, resume, resume=True)
    else:
        cfg = load_config(config, _overrides(data, method, epochs, seed, image_size, label_columns, group_column,
                                             devices, strategy, set_))
        result = run_train(cfg, out or default_run_dir(cfg.data.source, cfg.method.name))
    if result is not None:
        _print_summary(result)


def _print_summary(run_dir: Path) -> None:
    import json

    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    ci = m["test_ci"]
    parts = [f"{k} {ci[k]['value']:.3f} [{ci[k]['low']:.3f}, {ci[k]['high']:.3f}]" for k in ("acc", "auc", "f1_macro") if k in ci]
    console.print(f"[bold green]done[/] {run_dir}\n  test: " + "; ".join(parts) + f"\n  report: {Path(run_dir) / 'report.html'}")


@app.command()
@friendly
def evaluate(run_dir: Path, set_: Optional[list[str]] = SetOpt) -> None:
    """Evaluate a trained run on its test split (or other data via -s data.source=...)."""
    from diffmed.engine.run import evaluate as run_evaluate

    result = run_evaluate(run_dir, set_ or None)
    ci = result["test_ci"]
    for k, v in ci.items():
        console.print(f"{k:>14}: {v['value']:.4f}  95% CI [{v['low']:.4f}, {v['high']:.4f}]")


@app.command()
@friendly
def predict(
    run_dir: Path, images: Optional[list[str]] = typer.Argument(None, help="Image files or folders"),
    csv: Optional[Path] = typer.Option(None, help="CSV with a column of image paths"),
    path_column: str = "path", out: Path = typer.Option(Path("predictions.csv"), help="Output CSV"),
) -> None:
    """Predict classes with calibrated confidences for new images (PNG/JPEG/DICOM)."""
    from diffmed.engine.predict import expand_inputs, predict_images
    from diffmed.engine.run import load_trained

    method, meta, _ = load_trained(run_dir)
    df = predict_images(method, meta, expand_inputs(images or [], csv, path_column))
    df.to_csv(out, index=False)
    console.print(f"wrote {len(df)} predictions to {out}")


@app.command()
@friendly
def report(run_dir: Path) -> None:
    """(Re)write report.md and report.html of a run."""
    from diffmed.report import write_report

    md, html = write_report(run_dir)
    console.print(f"wrote {md} and {html}")


@app.command()
@friendly
def compare(run_a: Path, run_b: Path, n_boot: int = 2000, seed: int = 0) -> None:
    """McNemar test and paired bootstrap of AUC/F1/ACC differences between two runs on the same test set."""
    from diffmed.evaluation.compare import compare_runs, format_comparison

    typer.echo(format_comparison(compare_runs(run_a, run_b, n_boot=n_boot, seed=seed)))


@app.command()
@friendly
def benchmark(
    data: str = typer.Option("pneumoniamnist", help="Dataset: .npz, CSV, image folder or MedMNIST name"),
    methods: str = typer.Option("all", help="all, or a comma-separated list (see `diffmed methods`)"),
    seeds: Optional[int] = typer.Option(None, help="Seeds per method (default: the budget's)"),
    budget: str = typer.Option("quick", help="quick (minutes on CPU) or full (the README protocol)"),
    out: Optional[Path] = typer.Option(None, help="Benchmark folder (rerun the same command to resume)"),
    jobs: int = typer.Option(1, help="Runs in parallel processes"),
    gpus: int = typer.Option(0, help="GPUs to spread parallel runs over (one per process)"),
    balance_to: Optional[float] = typer.Option(None, help="Synthetic images fill each class to this share of the "
                                               "largest (default: the budget's)"),
    param: Optional[list[str]] = typer.Option(None, help="METHOD.PARAM=VALUE: one method's setting on top of the "
                                              "budget's, e.g. diffusion_classifier.vae_epochs=10 (repeatable)"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Compare methods on one dataset: same splits, several seeds, CIs, significance, one report."""
    from diffmed.benchmark import run_benchmark

    _setup_logging(False)
    out = out or Path("runs") / f"benchmark-{Path(data).stem}-{budget}"
    md, html = run_benchmark(data, out, methods, seeds, budget, jobs, gpus, set_ or [], balance_to, param or [])
    typer.echo(md.read_text().split("## Significance")[0])
    console.print(f"[bold green]report[/] {html}")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from diffmed.methods import METHODS

    for name in METHODS.names():
        typer.echo(name)


@data_app.command("check")
@friendly
def data_check(
    data: str = typer.Option("pneumoniamnist", help="Dataset: .npz, CSV, image folder or MedMNIST name"),
    out: Path = typer.Option(Path("runs/data-check"), help="Folder for fingerprint.json and splits.json"),
    label_columns: Optional[str] = None, group_column: Optional[str] = None, image_size: Optional[int] = None,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Fingerprint a dataset: class counts per split, imbalance, sizes, intensities, duplicates, leakage."""
    from diffmed.config import load_config
    from diffmed.data.check import check_dataset, format_fingerprint

    cfg = load_config(None, _overrides(data, None, None, None, image_size, label_columns, group_column, None, None, set_))
    out.mkdir(parents=True, exist_ok=True)
    typer.echo(format_fingerprint(check_dataset(cfg.data, out)))


@app.command()
@friendly
def quickstart(
    data: str = typer.Option("pneumoniamnist", help="Dataset (default: PneumoniaMNIST)"),
    out: Optional[Path] = None, epochs: int = 5, seed: int = 0,
) -> None:
    """The main job in one command: check the data, train a ResNet-18 baseline, evaluate, write a report."""
    from diffmed.config import load_config
    from diffmed.data.check import check_dataset, format_fingerprint
    from diffmed.engine.run import train as run_train

    _setup_logging(False)
    cfg = load_config(None, _overrides(data, "baseline", epochs, seed, None, None, None, None, None, []))
    run_dir = out or default_run_dir(cfg.data.source, "baseline")
    run_dir.mkdir(parents=True, exist_ok=True)
    typer.echo(format_fingerprint(check_dataset(cfg.data, run_dir)))
    _print_summary(run_train(cfg, run_dir))


from diffmed.cli_augment import augment_cmd  # noqa: E402  (needs `friendly`)
from diffmed.cli_generate import eval_generator_cmd, generate_cmd, train_generator_cmd  # noqa: E402

generator_app = typer.Typer(help="Train and evaluate class-conditional diffusion generators.", no_args_is_help=True)
app.add_typer(generator_app, name="generator")
generator_app.command("train")(friendly(train_generator_cmd))
generator_app.command("eval")(friendly(eval_generator_cmd))
app.command("generate")(friendly(generate_cmd))
app.command("augment")(friendly(augment_cmd))

from diffmed.cli_pretrain import register as _register_pretrain  # noqa: E402

_register_pretrain(app)  # diffmed pretrain, diffmed vae train

from diffmed import cli_dcube  # noqa: E402

cli_dcube.register(app)  # diffmed dcube analyze


def main() -> None:  # pragma: no cover
    app(prog_name="diffmed")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
