"""Report figures drawn on the Agg canvas (no pyplot state, safe in headless and parallel runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, roc_curve

from diffmed.evaluation.metrics import one_vs_rest, reliability_curve


def _figure(width: float = 5.0, height: float = 4.0, **subplots: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (creating folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def plot_roc(task: str, y_true: Any, probs: Any, class_names: Sequence[str], path: str | Path,
             mask: Any = None) -> Path:
    """One-vs-rest ROC curve per class (the positive class only for binary), AUC in the legend."""
    fig, ax = _figure()
    for c, t, s in one_vs_rest(task, y_true, probs, mask):
        if (task == "binary" and c == 0) or not 0 < t.sum() < len(t):
            continue
        fpr, tpr, _ = roc_curve(t, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def _draw_matrix(ax: Any, m: np.ndarray, labels: Sequence[str], title: str) -> None:
    """Counts annotated on a row-normalised heat map (rows true, columns predicted)."""
    rows = m.sum(1, keepdims=True)
    ax.imshow(np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize="small",
                color="white" if rows[i, 0] and v / rows[i, 0] > 0.5 else "black")
    ticks = range(len(labels))
    ax.set(xticks=ticks, yticks=ticks, xlabel="Predicted", ylabel="True", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)


def plot_confusion(cm: Any, class_names: Sequence[str], path: str | Path) -> Path:
    """Confusion matrix (C x C), or a grid of per-label 2 x 2 matrices for multilabel."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim == 2:
        size = 2.5 + 0.5 * len(class_names)
        fig, ax = _figure(size, size)
        _draw_matrix(ax, cm, class_names, "Confusion matrix")
        return _save(fig, path)
    cols = min(4, len(cm))
    nrows = -(-len(cm) // cols)
    fig, axes = _figure(3.0 * cols, 3.0 * nrows, nrows=nrows, ncols=cols, squeeze=False)
    for ax in axes.flat[len(cm):]:
        ax.axis("off")
    for ax, m, name in zip(axes.flat, cm, class_names):
        _draw_matrix(ax, m, ["neg", "pos"], name)
    return _save(fig, path)


def plot_reliability(task: str, y_true: Any, probs: Any, path: str | Path, mask: Any = None,
                     n_bins: int = 15, uncalibrated: Any = None) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) with a histogram of confidences; draws the
    probabilities before temperature scaling too when ``uncalibrated`` is given."""
    fig, (ax, hist) = _figure(5.0, 5.5, nrows=2, height_ratios=[3, 1], sharex=True)
    curves = {"before temperature": uncalibrated, "calibrated": probs} if uncalibrated is not None else {"model": probs}
    for label, p in curves.items():
        r = reliability_curve(y_true, p, n_bins=n_bins, task=task, mask=mask)
        ax.plot(r["confidence"], r["accuracy"], marker="o", ms=3, label=label)
        hist.stairs(r["count"], r["edges"], fill=True, alpha=0.4, label=label)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    ax.set(ylabel="Accuracy", ylim=(0, 1.01), title="Reliability (top-label)")
    ax.legend(fontsize="small")
    hist.set(xlabel="Confidence", ylabel="Count", xlim=(0, 1))
    return _save(fig, path)


def plot_per_class_recall(per_class: dict, class_names: Sequence[str], path: str | Path) -> Path:
    """Horizontal bars of recall per class, annotated with the class support."""
    recall = np.asarray(per_class["recall"], dtype=np.float64)
    support = per_class.get("support", [None] * len(recall))
    fig, ax = _figure(5.0, 1.0 + 0.35 * len(class_names))
    y = np.arange(len(class_names))
    ax.barh(y, np.nan_to_num(recall), color="tab:blue")
    for i, (r, n) in enumerate(zip(recall, support)):
        ax.text(min(np.nan_to_num(r), 1) + 0.01, i, f"{r:.2f}" + ("" if n is None else f" (n={n})"),
                va="center", fontsize="small")
    ax.set(yticks=y, xlim=(0, 1.25), xlabel="Recall", title="Recall per class")
    ax.set_yticklabels(class_names)
    ax.invert_yaxis()
    return _save(fig, path)


def training_series(metrics_csv_path: str | Path) -> dict[str, dict[str, pd.Series]]:
    """Per-epoch means of each ``train/`` and ``val/`` column of a Lightning CSVLogger file, grouped by
    metric name (``_step``/``_epoch`` suffixes dropped), e.g. ``{"loss": {"train/loss": ..., "val/loss": ...}}``."""
    df = pd.read_csv(metrics_csv_path)
    x = "epoch" if "epoch" in df else "step"
    groups: dict[str, dict[str, pd.Series]] = {}
    for col in df.columns:
        if not col.startswith(("train/", "val/")) or x not in df:
            continue
        s = df[[x, col]].dropna().groupby(x)[col].mean()
        if len(s):
            key = col.split("/", 1)[1].removesuffix("_epoch").removesuffix("_step")
            groups.setdefault(key, {})[col] = s
    return groups


def plot_training_curves(metrics_csv_path: str | Path, path: str | Path) -> Path:
    """One panel per metric with its train/ and val/ series against epoch; ValueError if none logged."""
    groups = training_series(metrics_csv_path)
    if not groups:
        raise ValueError(f"{metrics_csv_path} has no train/ or val/ columns with values to plot")
    fig, axes = _figure(4.0 * len(groups), 3.2, ncols=len(groups), squeeze=False)
    for ax, (key, series) in zip(axes.flat, groups.items()):
        for col, s in series.items():
            ax.plot(s.index, s.to_numpy(), marker="o", ms=3, label=col)
        ax.set(xlabel=s.index.name, title=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_trajectories(probs: np.ndarray, timesteps: list[int], targets: list[int], class_names: list[str],
                      path: Path) -> Path:
    """Predicted probability of every class along a reverse diffusion chain, one panel per image."""
    n = len(probs)
    fig, axes = _figure(2.6 * n, 2.8, ncols=n, squeeze=False, sharey=True)
    for i, ax in enumerate(axes[0]):
        for c, name in enumerate(class_names):
            ax.plot(range(len(timesteps)), probs[i, :, c], marker="o", ms=3, label=name)
        ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps], rotation=90, fontsize=6)
        ax.set_title(f"true {class_names[targets[i]]}", fontsize=8)
        ax.set_xlabel("DDIM timestep", fontsize=7)
    axes[0][0].set_ylabel("probability")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)
