"""A run's report as Markdown and self-contained HTML, built from the files a run directory holds.

The report is described once as sections of blocks (text, tables, images, code) and rendered twice, so
the two formats cannot drift apart. Image ids from ``predictions.csv`` are never written: they may be
patient identifiers.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from diffmed.evaluation.compare import RunPredictions, load_predictions, read_run_json
from diffmed.evaluation.metrics import (
    apply_temperature, classification_metrics, expected_calibration_error, probs_to_logits,
)
from diffmed.report import plots

HEADLINE = ("acc", "balanced_acc", "auc", "f1_macro", "precision_macro", "recall_macro", "kappa",
            "kappa_quadratic", "ece", "nll", "brier")
METRIC_NAMES = {"acc": "Accuracy", "balanced_acc": "Balanced accuracy", "auc": "AUC (mean one-vs-rest)",
                "f1_macro": "F1 (macro)", "precision_macro": "Precision (macro)", "recall_macro": "Recall (macro)",
                "kappa": "Cohen's kappa", "kappa_quadratic": "Quadratic-weighted kappa",
                "ece": "ECE (15 bins)", "nll": "NLL", "brier": "Brier score"}
COST_NAMES = {"train_seconds": "Training time, main fit (s)", "stage_seconds": "Pre-training stages, all processes (s)",
              "images_per_second": "Training throughput (images/s)",
              "peak_memory_mb": "Peak memory (MB)", "infer_seconds_per_image": "Inference time per image (s)",
              "forward_passes_per_image": "Forward passes per image"}
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "auc", "support")
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:960px;margin:2rem auto;
     padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.8rem 0;display:block;overflow-x:auto} th{background:#f4f6f8}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left} tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;display:block;margin:.8rem 0}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.85rem}
"""


# ------------------------------------------------------------------------------------ document model
@dataclass
class Text:
    text: str

    def md(self) -> str:
        return self.text

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]

    def md(self) -> str:
        cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(map(cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in self.rows])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Image:
    path: Path
    """A PNG in the run's ``plots/`` folder; Markdown links it relative to the report."""
    alt: str
    href: str = ""
    """The Markdown link when the PNG lies elsewhere under the report's folder."""

    def md(self) -> str:
        return f"![{self.alt}]({self.href or f'{self.path.parent.name}/{self.path.name}'})"

    def html(self) -> str:
        data = base64.b64encode(self.path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(self.alt)}" src="data:image/png;base64,{data}">'


@dataclass
class Code:
    text: str
    lang: str = ""

    def md(self) -> str:
        return f"```{self.lang}\n{self.text.rstrip()}\n```"

    def html(self) -> str:
        return f"<pre><code>{html.escape(self.text.rstrip())}</code></pre>"


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    parts = [f"# {title}"] + [f"## {s.title}\n\n" + "\n\n".join(b.md() for b in s.blocks) for s in sections]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: Sequence[Section]) -> str:
    body = "\n".join(f'<section id="{s.id}">\n<h2>{html.escape(s.title)}</h2>\n'
                     + "\n".join(b.html() for b in s.blocks) + "\n</section>" for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------- run data
@dataclass
class RunFiles:
    """What the report reads from a run directory."""

    run_dir: Path
    saved: dict
    predictions: RunPredictions
    test: dict
    config: str | None

    @property
    def names(self) -> list[str]:
        return self.predictions.class_names


def _load_run(run_dir: Path) -> RunFiles:
    """Read the run; test metrics are recomputed from predictions.csv and overridden by metrics.json's."""
    saved = read_run_json(run_dir / "metrics.json")
    pred = load_predictions(run_dir)
    thresholds = saved.get("thresholds") if pred.task in ("binary", "multilabel") else None
    computed = classification_metrics(pred.task, pred.y_true, pred.probs, thresholds, pred.mask,
                                      class_names=pred.class_names)
    config = run_dir / "config.yaml"
    return RunFiles(run_dir, saved, pred, {**computed, **saved.get("test", {})},
                    config.read_text() if config.is_file() else None)


def _fmt(v: Any, digits: int = 3) -> str:
    """A table cell: fixed decimals for floats, '–' where a value is missing or undefined."""
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------- sections
def _summary(run: RunFiles) -> Section:
    s, p = run.saved, run.predictions
    rows = [("Dataset", s.get("dataset", "–")), ("Method", s.get("method", "–")), ("Task", p.task),
            ("Seed", s.get("seed", "–")), ("Classes", f"{len(run.names)}: {', '.join(run.names)}"),
            ("Test images", s.get("n_test", len(p.y_true)))]
    return Section("summary", "Summary", [Table(("Item", "Value"), [(k, _fmt(v)) for k, v in rows])])


def _headline(run: RunFiles) -> Section:
    ci, val = run.saved.get("test_ci", {}), run.saved.get("val", {})
    rows = []
    for key in HEADLINE:
        if isinstance(run.test.get(key), (int, float)):
            c = ci.get(key, {})
            interval = f"[{_fmt(c['low'])}, {_fmt(c['high'])}]" if "low" in c else "–"
            rows.append((METRIC_NAMES[key], _fmt(run.test[key]), interval, _fmt(val.get(key))))
    blocks = [Table(("Metric", "Test", "95% CI (bootstrap)", "Validation"), rows)]
    return Section("headline-metrics", "Headline metrics", blocks + [Text(n) for n in run.test.get("notes", [])])


def _per_class(run: RunFiles, plot: Path) -> Section:
    pc, n = run.test["per_class"], len(run.names)
    rows = [(name, *(_fmt(pc.get(k, [None] * n)[i]) for k in PER_CLASS_COLUMNS)) for i, name in enumerate(run.names)]
    support = "positives per label" if run.predictions.task == "multilabel" else "test images per class"
    table = Table(("Class", "Precision", "Recall", "F1", "AUC", "Support"), rows)
    blocks = [table, Text(f"Support: {support}."), Image(plot, "Recall per class")]
    return Section("per-class", "Per-class metrics", blocks)


def _calibration(run: RunFiles, plot: Path, ece_before: float) -> Section:
    t = run.saved.get("temperature")
    rows = [("Before temperature scaling", _fmt(ece_before)), ("After temperature scaling", _fmt(run.test.get("ece")))]
    text = (f"Temperature T = {_fmt(t)}, fitted on the validation split by minimising NLL. The probabilities "
            "in predictions.csv are temperature-scaled; 'before' undoes the scaling.") if t else \
        "No temperature was fitted: both rows use the model's raw probabilities."
    table = Table(("Probabilities", "ECE (15 bins)"), rows)
    return Section("calibration", "Calibration", [Text(text), table, Image(plot, "Reliability diagram")])


def _training(logs: Path, path: Path) -> Section:
    if not plots.training_series(logs):
        return Section("training", "Training curves", [Text("logs/metrics.csv holds no train/ or val/ values.")])
    return Section("training", "Training curves", [Image(plots.plot_training_curves(logs, path), "Training curves")])


def _cost(cost: dict) -> Section:
    rows = [(COST_NAMES.get(k, k), f"{v:.4g}" if isinstance(v, float) else _fmt(v)) for k, v in cost.items()]
    return Section("cost", "Cost", [Table(("Measure", "Value"), rows)])


def _configuration(config: str | None) -> Section:
    block = Code(config, "yaml") if config is not None else Text("config.yaml not found in the run directory.")
    return Section("configuration", "Configuration", [block])


PICTURES = {  # optional pictures a run may leave in plots/: file stem -> (section id, title, caption)
    "gradcam": ("gradcam", "Grad-CAM", "Where the network looked for its predicted class (first test images; "
                "the image ids are not shown)."),
    "diffmic_trajectory": ("trajectory", "Denoising trajectory", "DiffMIC-v2's class probabilities implied "
                           "at each DDIM step, for the first test images."),
}


def _pictures(plots_dir: Path) -> list[Section]:
    return [Section(sid, title, [Text(caption), Image(plots_dir / f"{stem}.png", title)])
            for stem, (sid, title, caption) in PICTURES.items() if (plots_dir / f"{stem}.png").is_file()]


def _uncalibrated(run: RunFiles) -> Any:
    """Test probabilities before temperature scaling (or None when no temperature was fitted)."""
    t, p = run.saved.get("temperature"), run.predictions
    return apply_temperature(probs_to_logits(p.probs, p.task), 1.0 / t, p.task) if t else None


def _sections(run: RunFiles) -> list[Section]:
    """Every report section in order, drawing its figures into ``run_dir/plots``."""
    p, out, logs = run.predictions, run.run_dir / "plots", run.run_dir / "logs" / "metrics.csv"
    before = _uncalibrated(run)
    ece_before = run.test.get("ece") if before is None else expected_calibration_error(
        p.y_true, before, task=p.task, mask=p.mask)
    recall = plots.plot_per_class_recall(run.test["per_class"], run.names, out / "per_class_recall.png")
    reliability = plots.plot_reliability(p.task, p.y_true, p.probs, out / "reliability.png", mask=p.mask,
                                         uncalibrated=before)
    roc = plots.plot_roc(p.task, p.y_true, p.probs, run.names, out / "roc.png", mask=p.mask)
    confusion = plots.plot_confusion(run.test["confusion_matrix"], run.names, out / "confusion.png")
    sections = [
        _summary(run), _headline(run), _per_class(run, recall), _calibration(run, reliability, ece_before),
        Section("roc", "ROC curves", [Image(roc, "ROC curves")]),
        Section("confusion", "Confusion matrix", [Image(confusion, "Confusion matrix")]),
        *_pictures(out),
        _training(logs, out / "training_curves.png") if logs.is_file() else None,
        _cost(run.saved["cost"]) if run.saved.get("cost") else None,
        _configuration(run.config),
    ]
    return [s for s in sections if s is not None]


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and self-contained ``report.html`` into ``run_dir`` (figures in ``plots/``)."""
    run = _load_run(Path(run_dir))
    sections = _sections(run)
    title = f"diffmed report: {run.saved.get('method', 'model')} on {run.saved.get('dataset', 'dataset')}"
    md, page = run.run_dir / "report.md", run.run_dir / "report.html"
    md.write_text(render_markdown(title, sections), encoding="utf-8")
    page.write_text(render_html(title, sections), encoding="utf-8")
    return md, page
