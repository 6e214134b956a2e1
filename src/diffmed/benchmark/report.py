"""The benchmark's result file and report: one table, significance against the baseline and between the
methods that answer one question, cost, plots."""
from __future__ import annotations

import shutil
from pathlib import Path

from diffmed.bench import mean_std
from diffmed.benchmark.stats import paired_seed_pooled, seed_pooled_ci
from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json
from diffmed.engine.evaluate import headline_metrics
from diffmed.evaluation.compare import load_predictions, read_run_json
from diffmed.report.report import Image, Section, Table, Text, render_html, render_markdown

TESTED = ("acc", "balanced_acc", "f1_macro", "auc")
COST = ("train_seconds", "train_images_per_second", "infer_seconds_per_image", "forward_passes_per_image",
        "peak_memory_mb")
CONTRASTS = (("diffusion_rebalance", "traditional_rebalance"),)
"""Pairs tested against each other as well as against the baseline: does synthetic rebalancing beat
traditional augmentation (same classifier, same balanced sampler, only the extra images differ)?"""
RUN_PLOTS = {"roc": "ROC curves", "confusion": "Confusion matrices", "reliability": "Reliability diagrams",
             "per_class_recall": "Per-class recall"}


def collect(runs: dict[str, list[Path]], n_boot: int = 1000) -> dict:
    """benchmark.json content: per method seed statistics, paired tests against the baseline, cost."""
    preds = {m: [load_predictions(d) for d in dirs] for m, dirs in runs.items()}
    metrics = {m: [read_run_json(d / "metrics.json") for d in dirs] for m, dirs in runs.items()}
    out: dict = {"methods": {}, "seeds": [r["seed"] for r in metrics["baseline"]]}
    # bootstrapped over test images; calibration (ECE after temperature scaling) as mean ± std
    names = headline_metrics(preds["baseline"][0].task)
    for m in runs:
        ece = [r["test"]["ece"] for r in metrics[m]]
        entry = {"metrics": seed_pooled_ci(preds[m], names, n_boot), "ece": mean_std(ece),
                 "cost": {k: sum(r["cost"].get(k, 0.0) for r in metrics[m]) / len(metrics[m]) for k in COST}}
        if m != "baseline":
            entry["vs_baseline"] = paired_seed_pooled(preds[m], preds["baseline"], TESTED, n_boot)
        out["methods"][m] = entry
    out["contrasts"] = {f"{a} vs {b}": paired_seed_pooled(preds[a], preds[b], TESTED, n_boot)
                        for a, b in CONTRASTS if a in runs and b in runs}
    out["dataset"] = metrics["baseline"][0]["dataset"]
    out["class_names"] = metrics["baseline"][0]["class_names"]
    return out


def seed_cell(s: dict) -> str:
    """'mean ± std [CI low, high]' of a ``seed_pooled_ci`` entry; one seed has no spread to show."""
    spread = f" ± {s['std']:.3f}" if len(s["per_seed"]) > 1 else ""
    return f"{s['mean']:.3f}{spread} [{s['low']:.3f}, {s['high']:.3f}]"


def _tables(result: dict) -> list[Section]:
    methods = result["methods"]
    names = list(next(iter(methods.values()))["metrics"])
    main = Table(["method", *names, "ece"], [[m, *(seed_cell(e["metrics"][k]) for k in names),
                                                 "{:.3f} ± {:.3f}".format(*e["ece"])] for m, e in methods.items()])
    tests = {m: e["vs_baseline"] for m, e in methods.items() if "vs_baseline" in e} | result.get("contrasts", {})
    sig_rows = [[m, *(f"{t[k]['diff']:+.3f} (p={t[k]['p_value']:.3g})" for k in TESTED),
                 ", ".join(f"{p:.3g}" for p in t["mcnemar_p"])] for m, t in tests.items()]
    cost_rows = [[m, *(f"{e['cost'][k]:.4g}" for k in COST)] for m, e in methods.items()]
    return [
        Section("results", "Results", [Text(f"Test set of {result['dataset']}; seeds {result['seeds']}. "
                                            "Each cell: mean ± std over seeds [95% bootstrap CI of the seed mean]."), main]),
        Section("significance", "Significance against the baseline",
                [Text("Seed-mean difference to the baseline (or, for 'A vs B', of A to B) with paired bootstrap "
                      "p-value; McNemar p per seed."), Table(["method", *TESTED, "McNemar p"], sig_rows)]),
        Section("cost", "Cost", [Table(["method", *COST], cost_rows)]),
    ]


def _image(src: Path, root: Path, name: str, alt: str) -> Image | None:
    """``src`` as a report image: linked in place when it lies under the report's folder, else copied to plots/."""
    if not src.is_file():
        return None
    if root.resolve() in src.resolve().parents:
        return Image(src, alt, href=src.resolve().relative_to(root.resolve()).as_posix())
    (root / "plots").mkdir(parents=True, exist_ok=True)
    return Image(Path(shutil.copyfile(src, root / "plots" / name)), alt)


def _plot_sections(runs: dict[str, list[Path]], root: Path) -> list[Section]:
    sections = []
    for key, title in RUN_PLOTS.items():
        blocks = []
        for m, dirs in runs.items():
            img = _image(dirs[0] / "plots" / f"{key}.png", root, f"{m}_{key}.png", f"{m} {title}")
            if img:
                blocks += [Text(f"{m} (seed {dirs[0].name.rsplit('-s', 1)[-1]})"), img]
        sections.append(Section(key.replace("_", "-"), title, blocks or [Text("no plots found")]))
    return sections


def _diffusion_section(root: Path, runs: dict[str, list[Path]]) -> Section:
    """The diffusion methods' own pictures, where their runs left them."""
    blocks = []
    wanted = [("generated samples per class", sorted((root / "stages").glob("generator-s*/**/samples/*.png"))),
              ("KS p-values per layer (D-Cube)", sorted(p for d in runs.get("dcube", []) for p in d.glob("**/gaussianity.png"))),
              ("DiffMIC-v2 denoising trajectory", sorted(p for d in runs.get("diffmic_v2", []) for p in d.glob("**/*trajectory*.png"))),
              ("Grad-CAM (baseline)", sorted(p for d in runs.get("baseline", []) for p in d.glob("**/*gradcam*.png")))]
    for title, found in wanted:
        if found:
            blocks += [Text(title), _image(found[-1], root, f"diffusion_{len(blocks)}.png", title)]
        else:
            blocks.append(Text(f"{title}: not produced by these runs"))
    return Section("diffusion", "Diffusion methods", blocks)


def write_benchmark_report(root: Path, runs: dict[str, list[Path]], result: dict, about: dict[str, str]) -> tuple[Path, Path]:
    arms = Section("methods", "Methods", [Table(["method", "what it is"], [[m, about.get(m, "")] for m in runs])])
    sections = [arms, *_tables(result), *_plot_sections(runs, root), _diffusion_section(root, runs)]
    title = f"diffmed benchmark: {Path(result['dataset']).name}"
    atomic_write_json(root / "benchmark.json", result)
    md, html = root / "benchmark.md", root / "benchmark.html"
    atomic_write_bytes(md, render_markdown(title, sections).encode())
    atomic_write_bytes(html, render_html(title, sections).encode())
    return md, html
