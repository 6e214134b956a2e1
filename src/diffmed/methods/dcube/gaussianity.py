"""Feature selection with a Gaussianity metric (D-Cube, Sec. III-B.2.a, Fig. 2, Table VI).

A layer whose feature map looks Gaussian mostly carries the noise the network predicts; a layer whose
map deviates from a Gaussian keeps semantic content of the image. For every block and every timestep of
a grid, the block's feature map is compared with a normal distribution fitted to it (its own mean and
standard deviation) by the Kolmogorov-Smirnov test, ``scipy.stats.kstest``:

* ``reduce="pvalue"`` (default): each image's map is tested and the p-values (and statistics D) are
  averaged over the batch;
* ``reduce="feature"`` (a literal reading of Fig. 2's caption, "the average of features with a batch size
  of 256"): the maps are averaged over the batch and the averaged map is tested once.

Sample size: a map holds C x h x w values (10^4 - 10^5); with that many values the KS test rejects
normality for any deviation (p underflows to 0 for every layer) and a bigger map gets a smaller p for the
same deviation. Each test therefore uses the same number of values, ``max_values`` (default 1024), drawn
without replacement by a seeded generator, so that p-values of layers of different sizes are comparable
and alpha = 0.05 keeps its meaning; ``max_values=None`` tests every value.

Selection at the method's timestep: the *best* layers are those with p < alpha (or the ``top_k`` least
Gaussian ones); the *worst* layers, for the Table VI comparison, are the same number of most Gaussian
layers outside the best set. Layers are ranked by p-value, ties (p-values that underflow to 0 for the
large samples of a feature map) by the KS statistic D.

Note: fitting the normal's mean and std on the tested values makes the classical KS p-value conservative
(Lilliefors); the ranking, which is what the selection uses, is unaffected.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import stats

from diffmed.errors import ConfigError, RunError
from diffmed.methods.dcube.features import FrozenDiffusion, seeded_noise

log = logging.getLogger("diffmed.dcube")
Reduce = Literal["feature", "pvalue"]
DEFAULT_TIMESTEPS = (0, 50, 100, 200, 300, 500, 700, 900)
DEFAULT_MAX_VALUES = 1024
SELECTION_FORMAT = "diffmed-dcube-selection/1"


# ------------------------------------------------------------------ the test


def ks_normal(values: np.ndarray, max_values: int | None = None,
              rng: np.random.Generator | None = None) -> tuple[float, float]:
    """(D, p) of the KS test of ``values`` against N(mean, std) fitted to them, on at most ``max_values``
    of them (drawn by ``rng``); a constant map is maximally non-Gaussian (D = 1, p = 0)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if max_values is not None and len(values) > max_values:
        values = values[(rng or np.random.default_rng(0)).choice(len(values), max_values, replace=False)]
    mean, std = values.mean(), values.std()
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        return 1.0, 0.0
    res = stats.kstest(values, "norm", args=(mean, std))
    return float(res.statistic), float(res.pvalue)


class _LayerAccumulator:
    """Streams one layer's maps over batches: a running sum (``feature``) or per-image tests (``pvalue``)."""

    def __init__(self, reduce: Reduce, max_values: int | None = DEFAULT_MAX_VALUES, seed: int | list[int] = 0) -> None:
        if reduce not in ("feature", "pvalue"):
            raise ConfigError(f"reduce='{reduce}' must be 'feature' or 'pvalue'")
        if max_values is not None and max_values < 8:
            raise ConfigError(f"max_values={max_values} must be at least 8 (or None for every value)")
        self.reduce, self.n, self.max_values = reduce, 0, max_values
        self.rng = np.random.default_rng(seed)
        self.total: torch.Tensor | None = None
        self.d_sum = self.p_sum = 0.0

    def add(self, maps: torch.Tensor) -> None:
        maps = maps.detach().double().cpu()
        self.n += len(maps)
        if self.reduce == "feature":
            s = maps.sum(0)
            self.total = s if self.total is None else self.total + s
            return
        for m in maps.numpy():
            d, p = ks_normal(m, self.max_values, self.rng)
            self.d_sum, self.p_sum = self.d_sum + d, self.p_sum + p

    def result(self) -> tuple[float, float]:
        if self.n == 0:
            raise ValueError("no feature maps were added")
        if self.reduce == "feature":
            return ks_normal((self.total / self.n).numpy(), self.max_values, self.rng)
        return self.d_sum / self.n, self.p_sum / self.n


def layer_gaussianity(maps: dict[str, torch.Tensor], reduce: Reduce = "pvalue",
                      max_values: int | None = DEFAULT_MAX_VALUES, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{layer: (D, p)} for (N, C, h, w) feature maps held in memory (see the module docstring)."""
    out = {}
    for i, (name, m) in enumerate(maps.items()):
        acc = _LayerAccumulator(reduce, max_values, [seed, i])
        acc.add(m)
        out[name] = acc.result()
    return out


# ------------------------------------------------------------------ analysis over layers x timesteps


@dataclass
class GaussianityAnalysis:
    """KS p-values and statistics, (layers, timesteps), of one generator on a batch of images."""

    layers: list[str]
    timesteps: list[int]
    pvalues: np.ndarray
    statistics: np.ndarray
    n_images: int
    input: str = "x0"
    reduce: str = "pvalue"
    max_values: int | None = DEFAULT_MAX_VALUES

    def column(self, timestep: int) -> int:
        if timestep not in self.timesteps:
            raise ConfigError(f"timestep {timestep} was not analysed (timesteps: {self.timesteps})")
        return self.timesteps.index(timestep)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "timesteps": self.timesteps, "pvalues": self.pvalues.tolist(),
                "statistics": self.statistics.tolist(), "n_images": self.n_images, "input": self.input,
                "reduce": self.reduce, "max_values": self.max_values}

    @classmethod
    def from_dict(cls, d: dict) -> "GaussianityAnalysis":
        return cls(list(d["layers"]), [int(t) for t in d["timesteps"]], np.asarray(d["pvalues"], float),
                   np.asarray(d["statistics"], float), int(d["n_images"]), d.get("input", "x0"),
                   d.get("reduce", "pvalue"), d.get("max_values"))


def analyze_gaussianity(generator, images: torch.Tensor, layers: list[str] | None = None,
                        timesteps: tuple[int, ...] | list[int] = DEFAULT_TIMESTEPS, input: str = "x0",
                        noise_seed: int = 0, batch_size: int = 64, reduce: Reduce = "pvalue",
                        max_values: int | None = DEFAULT_MAX_VALUES,
                        device: torch.device | str | None = None) -> GaussianityAnalysis:
    """KS Gaussianity of every (or the named) block's output at each timestep (Fig. 2).

    ``generator``: a ClassConditionalDiffusion (e.g. from ``load_generator``) or a FrozenDiffusion;
    ``images``: (N, C, H, W) in the engine's normalised [-1, 1] scale. One forward pass per batch and
    timestep gives all blocks; ``xt`` inputs use one seeded noise tensor for every image.
    """
    frozen = FrozenDiffusion.from_generator(generator)
    names = frozen.check_layers(layers, "layers") if layers else frozen.block_names()
    steps = sorted({frozen.check_timestep(int(t), "timesteps") for t in timesteps})
    if len(images) == 0:
        raise ConfigError("the Gaussianity analysis needs at least one image")
    device = torch.device(device) if device is not None else frozen.alphas_cumprod.device
    home = frozen.alphas_cumprod.device
    frozen.to(device)
    noise = seeded_noise((1, *images.shape[1:]), noise_seed).to(device)
    pvalues, statistics = np.zeros((len(names), len(steps))), np.zeros((len(names), len(steps)))
    try:
        for j, t in enumerate(steps):
            accs = {n: _LayerAccumulator(reduce, max_values, [noise_seed, i, t]) for i, n in enumerate(names)}
            for start in range(0, len(images), batch_size):
                x0 = images[start : start + batch_size].to(device)
                with torch.no_grad():
                    feats = frozen.features(frozen.model_input(x0, t, input, noise), t, names)
                for n, f in feats.items():
                    accs[n].add(frozen.crop(f))
            for i, n in enumerate(names):
                statistics[i, j], pvalues[i, j] = accs[n].result()
    finally:
        frozen.to(home)
    return GaussianityAnalysis(names, steps, pvalues, statistics, len(images), input, reduce, max_values)


# ------------------------------------------------------------------ selection


@dataclass
class Selection:
    """Best (non-Gaussian) and worst (most Gaussian) layers at one timestep, with the rule used."""

    timestep: int
    best: list[str]
    worst: list[str]
    alpha: float
    top_k: int | None
    ranking: list[str] = field(default_factory=list)
    """All layers, least Gaussian first."""
    note: str = ""


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def rank_layers(analysis: GaussianityAnalysis, timestep: int) -> list[str]:
    """Layers from least to most Gaussian: by p-value, then by KS statistic D (descending)."""
    j = analysis.column(timestep)
    keys = [(analysis.pvalues[i, j], -analysis.statistics[i, j], i) for i in range(len(analysis.layers))]
    return [analysis.layers[i] for _, _, i in sorted(keys)]


def select_layers(analysis: GaussianityAnalysis, timestep: int, alpha: float = 0.05,
                  top_k: int | None = None) -> Selection:
    """Best layers: p < ``alpha`` (or the ``top_k`` least Gaussian); worst: as many most-Gaussian others."""
    if not 0 < alpha < 1:
        raise ConfigError(f"method.params.ks_alpha={alpha} must be in (0, 1)")
    if top_k is not None and not 1 <= top_k <= len(analysis.layers):
        raise ConfigError(f"method.params.ks_top_k={top_k} must be between 1 and the {len(analysis.layers)} layers")
    ranking = rank_layers(analysis, timestep)
    j = analysis.column(timestep)
    p = dict(zip(analysis.layers, analysis.pvalues[:, j]))
    note = ""
    if top_k is not None:
        best = ranking[:top_k]
    else:
        best = [n for n in ranking if p[n] < alpha]
        if not best:
            best, note = ranking[:1], f"no layer has p < {alpha}: kept the least Gaussian one"
    others = [n for n in reversed(ranking) if n not in best]
    worst = others[: len(best)]
    if not worst:
        worst = [ranking[-1]]
        note = _join(note, "every layer is in the best set: worst = the most Gaussian layer")
    elif len(worst) < len(best):
        note = _join(note, f"only {len(worst)} layer(s) outside the best set of {len(best)}: the worst set is smaller")
    order = analysis.layers
    return Selection(timestep, sorted(best, key=order.index), sorted(worst, key=order.index), alpha, top_k,
                     ranking, note)


# ------------------------------------------------------------------ outputs: JSON, CSV, markdown, plot


def write_selection(path: Path, analysis: GaussianityAnalysis | None, selection: Selection,
                    extra: dict | None = None) -> Path:
    """The selection (and its analysis) as JSON: what training reads back."""
    from diffmed.engine.checkpoint import atomic_write_json

    atomic_write_json(Path(path), {"format": SELECTION_FORMAT, "selection": asdict(selection),
                                   "analysis": None if analysis is None else analysis.to_dict(), **(extra or {})})
    return Path(path)


def read_selection(path: Path) -> tuple[Selection, GaussianityAnalysis | None, dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        sel = Selection(**data["selection"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"cannot read the D-Cube layer selection {path} ({err}); delete it to redo the "
                       "analysis") from None
    analysis = GaussianityAnalysis.from_dict(data["analysis"]) if data.get("analysis") else None
    return sel, analysis, data


def analysis_rows(analysis: GaussianityAnalysis, selection: Selection | None = None) -> list[dict]:
    """One row per (layer, timestep): p-value, D and the selection marks (at the selection's timestep)."""
    rows = []
    for i, layer in enumerate(analysis.layers):
        for j, t in enumerate(analysis.timesteps):
            here = selection is not None and t == selection.timestep
            rows.append({"layer": layer, "timestep": t, "p_value": float(analysis.pvalues[i, j]),
                         "ks_statistic": float(analysis.statistics[i, j]),
                         "best": bool(here and layer in selection.best),
                         "worst": bool(here and layer in selection.worst)})
    return rows


def markdown_pvalues(analysis: GaussianityAnalysis, selection: Selection | None = None) -> str:
    """Layers x timesteps table of p-values (D in brackets); * marks best, x marks worst layers."""
    head = ["layer", *(f"t={t}" for t in analysis.timesteps)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, layer in enumerate(analysis.layers):
        cells = []
        for j, t in enumerate(analysis.timesteps):
            mark = ""
            if selection is not None and t == selection.timestep:
                mark = " *" if layer in selection.best else " x" if layer in selection.worst else ""
            cells.append(f"{analysis.pvalues[i, j]:.3g} (D {analysis.statistics[i, j]:.3f}){mark}")
        lines.append("| " + " | ".join([layer, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_gaussianity(analysis: GaussianityAnalysis, selection: Selection | None, path: Path,
                     title: str = "") -> Path:
    """Fig. 2: KS p-value per layer, one line per timestep; stars = best, crosses = worst layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.55 * len(analysis.layers) + 2), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_p, ax_d = fig.subplots(1, 2)
    x = np.arange(len(analysis.layers))
    for ax, values, label in ((ax_p, analysis.pvalues, "KS p-value"), (ax_d, analysis.statistics, "KS statistic D")):
        for j, t in enumerate(analysis.timesteps):
            ax.plot(x, values[:, j], marker="o", ms=3, lw=1, label=f"t={t}")
        if selection is not None:
            j = analysis.column(selection.timestep)
            for names, marker, colour, what in ((selection.best, "*", "gold", "best"),
                                                 (selection.worst, "X", "red", "worst")):
                idx = [analysis.layers.index(n) for n in names]
                ax.scatter(idx, values[idx, j], marker=marker, s=160, c=colour, edgecolors="k", zorder=5,
                           label=f"{what} (t={selection.timestep})")
        ax.set_xticks(x, analysis.layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
    if selection is not None:
        ax_p.axhline(selection.alpha, ls="--", c="grey", lw=1)
    ax_p.set_ylim(-0.02, 1.02)
    ax_d.legend(fontsize=6, loc="best")
    fig.suptitle(title or f"KS Gaussianity of block outputs ({analysis.n_images} images, input {analysis.input}, "
                          f"reduce={analysis.reduce}, {analysis.max_values or 'all'} values per test)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def write_analysis(out_dir: Path, analysis: GaussianityAnalysis, selection: Selection | None,
                   extra: dict | None = None, title: str = "") -> dict[str, Path]:
    """gaussianity.csv / .md / .png and selection.json under ``out_dir``."""
    import pandas as pd

    from diffmed.engine.checkpoint import atomic_write_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "gaussianity.csv", "markdown": out_dir / "gaussianity.md",
             "plot": out_dir / "gaussianity.png", "json": out_dir / "selection.json"}
    atomic_write_bytes(paths["csv"], pd.DataFrame(analysis_rows(analysis, selection)).to_csv(index=False).encode())
    md = (f"# KS Gaussianity of block outputs\n\n{analysis.n_images} images, input {analysis.input}, "
          f"reduce={analysis.reduce}, {analysis.max_values or 'all'} values per test. "
          "p-value (KS statistic D); * best, x worst layers.\n\n")
    if selection is not None:
        md += (f"Selection at t={selection.timestep} (alpha {selection.alpha}, top_k {selection.top_k}): "
               f"best {selection.best}, worst {selection.worst}. {selection.note}\n\n")
    atomic_write_bytes(paths["markdown"], (md + markdown_pvalues(analysis, selection)).encode())
    plot_gaussianity(analysis, selection, paths["plot"], title)
    if selection is not None:
        write_selection(paths["json"], analysis, selection, extra)
    else:
        paths.pop("json")
    return paths


# ------------------------------------------------------------------ analysis of a run folder


def frozen_of_run(run: Path) -> FrozenDiffusion:
    """The frozen generator of a generator run, of a D-Cube run's stage, or inside a trained D-Cube model."""
    from diffmed.config import load_config
    from diffmed.diffusion.generative import generator_dir, load_generator
    from diffmed.engine.run import CONFIG_FILE, load_trained

    run = Path(run)
    for candidate in (run, run / "stages" / "generator"):
        if (generator_dir(candidate) / "model.json").is_file():
            return FrozenDiffusion.from_generator(load_generator(candidate))
    meta = run / "model" / "model.json"
    if meta.is_file() and json.loads(meta.read_text()).get("method") == "dcube":
        return load_trained(run)[0].frozen
    if (run / CONFIG_FILE).is_file():
        given = load_config(run / CONFIG_FILE).method.params.get("generator_run")
        if given and (generator_dir(Path(given)) / "model.json").is_file():
            return FrozenDiffusion.from_generator(load_generator(Path(given)))
    raise RunError(f"'{run}' holds no trained generator: pass a `diffmed generator train` run folder or a D-Cube run "
                   "whose generator stage has finished")


def run_root(run: Path) -> Path:
    """The folder holding the run's config.yaml (``run`` or, for ``RUN/generator``, its parent)."""
    from diffmed.engine.run import CONFIG_FILE

    run = Path(run)
    for folder in (run, run.parent):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise RunError(f"'{run}' has no {CONFIG_FILE}: cannot tell which training images to analyse")


def analyze_run(run: Path, out_dir: Path | None = None, n_images: int = 256,
                timesteps: list[int] | tuple[int, ...] = DEFAULT_TIMESTEPS, timestep: int | None = None,
                input: str | None = None, alpha: float = 0.05, top_k: int | None = None, reduce: Reduce = "pvalue",
                max_values: int | None = DEFAULT_MAX_VALUES, seed: int = 0, batch_size: int = 64,
                layers: list[str] | None = None) -> tuple[GaussianityAnalysis, Selection, dict[str, Path]]:
    """``diffmed dcube analyze``: Fig. 2 and the layer selection for a run's real training images.

    ``timestep`` / ``input`` default to a D-Cube run's own settings (else 100 / x0); outputs go to
    ``out_dir`` (default ``RUN/gaussianity``).
    """
    from diffmed.config import load_config
    from diffmed.engine.data import make_datamodule, prepare_data
    from diffmed.engine.inference import pick_device
    from diffmed.engine.run import CONFIG_FILE
    from diffmed.methods.dcube.method import analysis_images

    frozen = frozen_of_run(run)
    root = run_root(run)
    cfg = load_config(root / CONFIG_FILE)
    own = cfg.method.params if cfg.method.name == "dcube" else {}
    timestep = int(timestep if timestep is not None else own.get("timestep", 100))
    input = input or own.get("input", "x0")
    images = analysis_images(make_datamodule(cfg, prepare_data(cfg, root)), n_images, seed)
    analysis = analyze_gaussianity(frozen, images, layers, sorted(set(timesteps) | {timestep}), input, seed,
                                   batch_size, reduce, max_values, pick_device())
    selection = select_layers(analysis, timestep, alpha, top_k)
    title = f"{Path(cfg.data.source).name}: KS Gaussianity per block ({len(images)} training images)"
    paths = write_analysis(Path(out_dir) if out_dir else Path(run) / "gaussianity", analysis, selection,
                           {"run": str(run), "dataset": cfg.data.source}, title)
    return analysis, selection, paths
