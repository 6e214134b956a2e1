"""D-Cube against the same-run ResNet-18 baseline and DiffMIC-v2, with the paper's analyses on our data.

For each dataset and seed the step-1 generator (L_Gen; and once without L_Gen for the Table IV baseline
row) is trained ONCE with ``diffmed.diffusion.train_generator`` on the same data config (split seed and
fractions) as the classifiers, and shared by every D-Cube arm through ``method.params.generator_run``.
Every classifier is an ordinary run folder trained by the engine (``run_or_resume``): finished runs are
read back, killed ones resumed. All arms see the same data, split, optimiser, batch size and epochs; models
are chosen on validation AUC. Output (JSON + markdown + Fig. 2 PNGs) goes to ``benchmarks/results/dcube/``:

* main table: test ACC, balanced ACC, macro-F1, AUC (mean +- std over seeds, each seed's 95% bootstrap CI),
  paired bootstrap p-values against the baseline, inference cost relative to the baseline;
* Fig. 2: KS p-value per block and timestep with the selected (best) and worst layers marked;
* Table VI: best vs worst selection; Table IV (ablation) and Table VII (input) on the first dataset.

Each finished run's record (config, metrics, test predictions, model.json, a D-Cube run's KS selection and the
first seed's Gaussianity analysis; no classifier weights) and each generator's exported weights are kept under
``--out``/records/<dataset>/ (default ``benchmarks/results/dcube/records/``) and read back into an empty work
folder, so the committed records carry the benchmark across machines and sessions: only the missing runs are
trained, and a finished arm needs no generator. Generators reused from ``--generators`` are recorded by the
benchmark that trained them, not here.

    python benchmarks/dcube.py --seeds 3 --epochs 50 --gen-epochs 200            # GPU, hours
    python benchmarks/dcube.py --ablation-only --seeds 3 --epochs 50 --gen-epochs 200
    python benchmarks/dcube.py --ablation-only --finished-only ...   # Tables IV/VII of the runs finished so far
    # smoke check (minutes on CPU):
    python benchmarks/dcube.py --datasets pneumoniamnist --seeds 1 --epochs 1 --gen-epochs 1 \\
        --gen-size tiny --limit-train-batches 2 --ks-images 32 --skip-diffmic --set eval.bootstrap=50 \\
        --out /tmp/dcube_smoke --work /tmp/dcube_smoke/work
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from diffmed.bench import (GENERATOR_DONE, GENERATOR_RECORD, RUN_RECORD, add_location_args, check_same_settings,
                           cost_ratio, dataset_overrides, fmt, keep_record, markdown_table, paired, per_seed_ci,
                           pvalue_cells, restore_records, run_or_resume, settings_of, summarize, write_results)
from diffmed.config import load_config
from diffmed.diffusion.generative import train_generator
from diffmed.methods.dcube import TABLE_IV, TABLE_VI, TABLE_VII, read_selection

log = logging.getLogger("benchmarks.dcube")
METRICS = ("acc", "balanced_acc", "f1_macro", "auc")
DATASETS = ("pneumoniamnist", "pneumoniamnist_imbalanced", "ham10000")
# every D-Cube arm: (generator variant, method options); the full method serves as Table IV "+f_sub",
# Table VI "best" and Table VII "x0, t"
ARMS = {
    "dcube": ("lgen", {}),
    "dcube_worst": ("lgen", TABLE_VI["worst"]),
    "t4_baseline": ("plain", TABLE_IV["baseline"]),
    "t4_lgen": ("lgen", TABLE_IV["+L_Gen"]),
    "t4_fs": ("lgen", TABLE_IV["+Fs"]),
    "t4_lcls": ("lgen", TABLE_IV["+L_Cls"]),
    "t7_xt": ("lgen", TABLE_VII["xt, t"]),
    "t7_x0_0": ("lgen", TABLE_VII["x0, 0"]),
}
TABLE_IV_ROWS = [("Baseline (last layer, L_Diff only, CE)", "t4_baseline"), ("+ L_Gen", "t4_lgen"),
                 ("+ Fs (KS selection)", "t4_fs"), ("+ L_Cls (cycle + flip)", "t4_lcls"), ("+ f_sub", "dcube")]
PAPER_TABLE_IV = {"t4_baseline": (85.30, 75.82), "t4_lgen": (85.97, 77.10), "t4_fs": (87.86, 79.95),
                  "t4_lcls": (88.26, 80.61), "dcube": (93.61, 89.69)}
"""Pancreas CT (Acc, F1) of the paper, for orientation only: a different dataset."""
TABLE_VII_ROWS = [("x_0, t", "dcube"), ("x_t, t", "t7_xt"), ("x_0, 0", "t7_x0_0")]
ABLATION_ARMS = sorted({arm for _, arm in TABLE_IV_ROWS + TABLE_VII_ROWS})
REBALANCE_NAMES = {"lgen": "lcont", "plain": "plain"}
"""Generator folder names in ``benchmarks/rebalance.py``'s work (``--generators``)."""
RUN_DONE = "metrics.json"
DCUBE_RECORD = (*RUN_RECORD, "stages/dcube_selection.json")
"""A D-Cube run adds the KS selection that Table VI reads."""
FIG2_RECORD = tuple(f"stages/gaussianity/{name}" for name in ("gaussianity.png", "gaussianity.md", "selection.json"))
"""Fig. 2 reads the Gaussianity analysis of the first seed's run only."""


# ------------------------------------------------------------------ overrides


def flat_params(params: dict, prefix: str = "method.params") -> list[str]:
    """{"generator": {"use_contrastive": False}, "layers": "last"} -> dotted overrides (values as JSON = YAML)."""
    out = []
    for key, value in params.items():
        if isinstance(value, dict):
            out += flat_params(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def data_overrides(args: argparse.Namespace, dataset: str, seed: int, epochs: int,
                   batch: int | None = None) -> list[str]:
    """The data and training options every run shares; ``batch`` (default ``--batch-size``): the generator's."""
    extra = [f"train.limit_train_batches={args.limit_train_batches}"] if args.limit_train_batches else []
    return [*dataset_overrides(dataset, args.data_dir), f"train.max_epochs={epochs}", f"train.seed={seed}",
            f"train.batch_size={batch or args.batch_size}", "train.progress=false", *extra, *args.set]


def classifier_overrides(args: argparse.Namespace, dataset: str, seed: int) -> list[str]:
    """What every classifier shares (the paper's step 2: AdamW 2e-4; models chosen on validation AUC)."""
    return [*data_overrides(args, dataset, seed, args.epochs), "optim.optimizer=adamw", f"optim.lr={args.lr}",
            f"optim.weight_decay={args.weight_decay}", "optim.schedule=cosine", "train.monitor=val/auc"]


def generator_params(args: argparse.Namespace, variant: str) -> dict:
    lr = {"lr": args.gen_lr} if args.gen_lr is not None else {}
    return {"backbone": args.gen_backbone, "size": args.gen_size, "use_contrastive": variant == "lgen",
            "sample_every_n_epochs": None, **lr}


def dcube_params(args: argparse.Namespace, options: dict, generator_run: Path) -> dict:
    base = {"generator_run": str(generator_run), "ks_images": args.ks_images, "subfeatures": args.subfeatures}
    if args.ks_top_k:
        base["ks_top_k"] = args.ks_top_k
    return {**base, **{k: v for k, v in options.items() if k != "generator"}}


# ------------------------------------------------------------------ records


def records_dir(args: argparse.Namespace) -> Path:
    return args.out / "records"


def restore_dcube_records(args: argparse.Namespace) -> None:
    """Put the committed records of finished runs and generators into the work folder (finished ones stay)."""
    restore_records(records_dir(args), args.work, "*/*",
                    lambda record: GENERATOR_DONE if record.name.startswith("generator-") else RUN_DONE)


def keep(args: argparse.Namespace, run_dir: Path, patterns: tuple[str, ...], done: str) -> None:
    """Record a finished folder of the work folder (a generator reused from elsewhere is its owner's to keep)."""
    if run_dir.parent.parent == args.work:  # WORK/<dataset>/<run>, as restore_records puts it back
        keep_record(run_dir, records_dir(args) / run_dir.parent.name / run_dir.name, patterns, done)


def run_record(arm: str, seed: int) -> tuple[str, ...]:
    if arm in ("baseline", "diffmic_v2"):
        return RUN_RECORD
    return DCUBE_RECORD + (FIG2_RECORD if seed == 0 else ())


# ------------------------------------------------------------------ runs


def generator(args: argparse.Namespace, dataset: str, seed: int, variant: str) -> Path:
    """The shared step-1 generator of (dataset, seed, variant): trained once, resumed if killed."""
    run_dir = generator_dir(args, dataset, seed, variant)
    if not (run_dir / GENERATOR_DONE).is_file():
        resume = (run_dir / "config.yaml").is_file()
        log.warning("%s generator %s", "resuming" if resume else "training", run_dir)
        os.environ.pop("DIFFMED_RUN_DIR", None)
        cfg = None if resume else load_config(None, data_overrides(args, dataset, seed, args.gen_epochs,
                                                                  args.gen_batch_size))
        train_generator(cfg, run_dir, None if resume else generator_params(args, variant), resume=resume)
    keep(args, run_dir, GENERATOR_RECORD, GENERATOR_DONE)
    return run_dir


def generator_seconds(run_dir: Path) -> float | None:
    """Training seconds of a generator over all its segments (its model.json, or the rebalancing benchmark's
    bench_cost.json for a reused one)."""
    for path in (run_dir / GENERATOR_DONE, run_dir / "bench_cost.json"):
        seconds = json.loads(path.read_text()).get("train_seconds") if path.is_file() else None
        if seconds:
            return seconds
    return None


def generator_dir(args: argparse.Namespace, dataset: str, seed: int, variant: str = "lgen") -> Path:
    """The benchmark's own generator folder, or a finished one from ``--generators`` if it has none yet
    (D-Cube's stage refuses a generator trained on other splits)."""
    own = args.work / dataset / f"generator-{variant}-s{seed}"
    reused = args.generators / f"{REBALANCE_NAMES[variant]}-s{seed}" if args.generators else None
    return reused if reused and not own.is_dir() and (reused / GENERATOR_DONE).is_file() else own


def arm_dir(args: argparse.Namespace, dataset: str, arm: str, seed: int) -> Path:
    return args.work / dataset / f"{arm}-s{seed}"


def run_arm(args: argparse.Namespace, dataset: str, seed: int, arm: str) -> tuple[dict, Path]:
    """The arm's metrics on this seed: read back when finished (its generator is not needed), else trained."""
    run_dir = arm_dir(args, dataset, arm, seed)
    if (run_dir / RUN_DONE).is_file():
        check_same_settings(run_dir, load_config(None, arm_overrides(args, dataset, seed, arm, build=False)))
    else:
        run_or_resume(arm_overrides(args, dataset, seed, arm), run_dir)
    keep(args, run_dir, run_record(arm, seed), RUN_DONE)
    return json.loads((run_dir / RUN_DONE).read_text()), run_dir


def arm_overrides(args: argparse.Namespace, dataset: str, seed: int, arm: str, build: bool = True) -> list[str]:
    """The arm's config overrides; a D-Cube arm's point at its generator, trained first if need be (``build``;
    else only its folder, to check a finished run's settings)."""
    overrides = classifier_overrides(args, dataset, seed)
    if arm == "baseline":
        overrides += ["method.name=baseline", "method.params.backbone=resnet18"]
    elif arm == "diffmic_v2":
        # its DCG prior stage trains as many epochs as every classifier (as in benchmarks/diffmic.py)
        overrides += ["method.name=diffmic_v2", f"method.params.dcg_epochs={args.epochs}",
                      *(f"method.params.{kv}" for kv in args.diffmic_params)]
    else:
        variant, options = ARMS[arm]
        gen = generator(args, dataset, seed, variant) if build else generator_dir(args, dataset, seed, variant)
        overrides += ["method.name=dcube", *flat_params(dcube_params(args, options, gen))]
    return overrides


def finished_seeds(args: argparse.Namespace, dataset: str, arm: str) -> list[int]:
    """Seeds of ``--seeds`` to report: all of them, or those whose run has finished with ``--finished-only`` or
    for an arm that ``--arms`` leaves to another process."""
    report_only = args.finished_only or (args.arms is not None and arm not in args.arms)
    return [s for s in range(args.seeds)
            if not report_only or (arm_dir(args, dataset, arm, s) / RUN_DONE).is_file()]


def arm_results(args: argparse.Namespace, dataset: str, arm: str) -> dict | None:
    """Summary, seeds and run folders of the arm (None: ``--finished-only`` and no seed has finished)."""
    seeds = finished_seeds(args, dataset, arm)
    if not seeds:
        return None
    runs = [run_arm(args, dataset, seed, arm) for seed in seeds]
    return {"summary": summarize([m for m, _ in runs], METRICS), "seeds": seeds, "dirs": [d for _, d in runs]}


def selections(dirs: list[Path]) -> list[dict]:
    """The layers each run used (from its stage's selection JSON)."""
    out = []
    for d in dirs:
        sel, _, _ = read_selection(d / "stages" / "dcube_selection.json")
        meta = json.loads((d / "model" / "model.json").read_text())
        out.append({"used": meta["params"]["selected_layers"], "best": sel.best, "worst": sel.worst, "note": sel.note})
    return out


# ------------------------------------------------------------------ tables


MAIN_HEADER = ["method", "test ACC", "balanced ACC", "macro-F1", "test AUC", "ACC 95% CI per seed",
               "AUC 95% CI per seed", "forward passes / image (x baseline)", "s / image (x baseline)", "train s"]


def train_seconds(s: dict, extra_seconds: float = 0.0) -> str:
    return f"{s['cost'].get('train_seconds', float('nan')) + extra_seconds:.0f}"


def main_row(name: str, s: dict, base: dict, extra_seconds: float = 0.0) -> list[str]:
    return [name, *(fmt(s[m]) for m in METRICS), per_seed_ci(s, "acc"), per_seed_ci(s, "auc"),
            cost_ratio(s, base, "forward_passes_per_image"), cost_ratio(s, base, "infer_seconds_per_image"),
            train_seconds(s, extra_seconds)]


def fig2(dataset: str, dcube_dir: Path, out: Path) -> tuple[str, dict]:
    """Copy the seed-0 run's Gaussianity plot and table (Fig. 2 for our data)."""
    src = dcube_dir / "stages" / "gaussianity"
    if not (src / "gaussianity.png").is_file():
        return f"(no Gaussianity analysis in {src})\n", {}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "gaussianity.png", out / f"fig2_{dataset}.png")
    sel, analysis, _ = read_selection(src / "selection.json")
    md = (f"![Fig. 2, {dataset}](fig2_{dataset}.png)\n\n" + (src / "gaussianity.md").read_text().split("\n", 2)[2])
    return md, {"selection": asdict(sel), "analysis": analysis.to_dict() if analysis else None}


def compare_dataset(args: argparse.Namespace, dataset: str) -> tuple[dict, str]:
    arms = ["baseline", "dcube", "dcube_worst"] + ([] if args.skip_diffmic else ["diffmic_v2"])
    res = {arm: arm_results(args, dataset, arm) for arm in arms}
    base = res["baseline"]["summary"]
    gen_s = [generator_seconds(generator_dir(args, dataset, s)) for s in range(args.seeds)]
    gen_mean = sum(g for g in gen_s if g) / max(1, sum(1 for g in gen_s if g))
    versus_base = {arm: paired(res[arm]["dirs"], res["baseline"]["dirs"], METRICS, args.n_boot)
                   for arm in arms if arm != "baseline"}
    best_vs_worst = paired(res["dcube"]["dirs"], res["dcube_worst"]["dirs"], METRICS, args.n_boot)
    names = {"baseline": "ResNet-18", "dcube": "D-Cube", "diffmic_v2": "DiffMIC-v2"}
    rows = [main_row(names[a], res[a]["summary"], base, gen_mean if a == "dcube" else 0.0)
            for a in ("baseline", "diffmic_v2", "dcube") if a in res]
    fig_md, fig_data = fig2(dataset, res["dcube"]["dirs"][0], args.out)
    sel_best, sel_worst = selections(res["dcube"]["dirs"]), selections(res["dcube_worst"]["dirs"])
    t6_rows = [[name, fmt(res[a]["summary"]["acc"]), fmt(res[a]["summary"]["f1_macro"]), fmt(res[a]["summary"]["auc"]),
                "; ".join(",".join(s["used"]) for s in sels)]
               for name, a, sels in (("Worst selection", "dcube_worst", sel_worst),
                                     ("Best selection", "dcube", sel_best))]
    md = [f"## {dataset} ({args.epochs} epochs, generator {args.gen_backbone}-{args.gen_size} "
          f"{args.gen_epochs} epochs, {args.seeds} seeds)\n",
          markdown_table(MAIN_HEADER, rows),
          f"D-Cube train s includes its generator ({gen_mean:.0f} s mean, shared by all D-Cube arms).\n",
          "Paired bootstrap against ResNet-18, per seed (diff, p):\n",
          markdown_table(["method", *METRICS], [[names.get(a, a), *pvalue_cells(c, METRICS)] for a, c in versus_base.items()
                                                if a in names]),
          f"### Fig. 2 on {dataset}\n", fig_md,
          f"### Table VI on {dataset}: best vs worst KS selection\n",
          markdown_table(["selection", "test ACC", "macro-F1", "test AUC", "layers per seed"], t6_rows),
          "Best minus worst, per seed (diff, p):\n", markdown_table(list(METRICS), [pvalue_cells(best_vs_worst, METRICS)])]
    out = {"summaries": {a: r["summary"] for a, r in res.items()}, "paired_vs_baseline": versus_base,
           "best_vs_worst": best_vs_worst, "selections": {"best": sel_best, "worst": sel_worst},
           "generator_train_seconds": gen_s, "fig2": fig_data}
    return out, "\n".join(md)


def ablations(args: argparse.Namespace, dataset: str) -> tuple[dict, str]:
    """Table IV (cumulative components) and Table VII (input) on ``dataset``."""
    res = {arm: r for arm in ABLATION_ARMS if (r := arm_results(args, dataset, arm)) is not None}
    if "dcube" not in res:
        raise SystemExit(f"no finished full D-Cube run on {dataset} (dcube-sN in {args.work / dataset}): "
                         "every ablation row is compared with it")
    versus_full = {}
    for arm in (a for a in res if a != "dcube"):  # per seed, on the seeds both have finished
        seeds = [s for s in res[arm]["seeds"] if s in res["dcube"]["seeds"]]
        versus_full[arm] = paired([arm_dir(args, dataset, arm, s) for s in seeds],
                                  [arm_dir(args, dataset, "dcube", s) for s in seeds], METRICS, args.n_boot)
    full = res["dcube"]["summary"]

    def rows(table, paper=None):
        out = []
        for name, arm in table:
            if arm not in res:
                out.append([name, *(["not finished"] * (len(METRICS) + 4))])
            else:
                s = res[arm]["summary"]
                p = pvalue_cells(versus_full[arm], METRICS) if arm in versus_full else ["—"] * len(METRICS)
                out.append([name, *(fmt(s[m]) for m in METRICS), p[0], p[3],
                            cost_ratio(s, full, "infer_seconds_per_image"), train_seconds(s)])
            out[-1] += ["{:.2f} / {:.2f}".format(*paper[arm])] if paper else []
        return out

    head = ["row", *METRICS, "ACC minus full (p) per seed", "AUC minus full (p) per seed", "s / image (x full)",
            "train s"]
    seeds = "seeds " + ", ".join(map(str, sorted({s for r in res.values() for s in r["seeds"]})))
    md = [f"## Table IV on {dataset}: ablation ({args.epochs} epochs, {seeds})\n",
          f"Each row's mean is over its finished seeds; \"minus full\" pairs it with the full method on those seeds. "
          "train s: the head's training (the generators are shared and not counted).\n",
          markdown_table(head + ["paper pancreas CT Acc / F1"], rows(TABLE_IV_ROWS, PAPER_TABLE_IV)),
          f"## Table VII on {dataset}: input of the feature pass\n", markdown_table(head, rows(TABLE_VII_ROWS))]
    return {"dataset": dataset, "rows": {a: r["summary"] for a, r in res.items()}, "paired_vs_full": versus_full}, \
        "\n".join(md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    ap.add_argument("--epochs", type=int, default=50, help="classifier epochs (every arm)")
    ap.add_argument("--gen-epochs", type=int, default=200, help="step-1 generator epochs")
    ap.add_argument("--gen-backbone", default="uvit")
    ap.add_argument("--gen-size", default="small", help="tiny | small | base")
    ap.add_argument("--gen-batch-size", type=int, default=None, help="generator batch (default: --batch-size)")
    ap.add_argument("--gen-lr", type=float, default=None, help="generator learning rate (default: the generator's own)")
    ap.add_argument("--generators", type=Path, default=None,
                    help="reuse finished generators from this folder (lcont-sN / plain-sN, e.g. "
                         "benchmarks/work/rebalance/generators) instead of training them")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of every classifier (the paper's)")
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--subfeatures", default="resnet18", help="D-Cube sub-feature CNN")
    ap.add_argument("--ks-images", type=int, default=256)
    ap.add_argument("--ks-top-k", type=int, default=None, help="select the k least Gaussian layers instead of p<0.05")
    ap.add_argument("--skip-diffmic", action="store_true", help="leave DiffMIC-v2 out (e.g. if not installed)")
    ap.add_argument("--diffmic-params", nargs="*", default=[], help="key=value options of DiffMIC-v2 only")
    ap.add_argument("--ablation-only", action="store_true", help="only Tables IV and VII on the first dataset")
    ap.add_argument("--no-ablation", action="store_true", help="skip Tables IV and VII")
    ap.add_argument("--arms", nargs="+", default=None, choices=ABLATION_ARMS,
                    help="train only these arms' runs (e.g. to share the runs between processes); the tables "
                    "show the other arms' finished seeds")
    ap.add_argument("--finished-only", action="store_true",
                    help="with --ablation-only: train nothing, write Tables IV and VII from the finished runs")
    ap.add_argument("--limit-train-batches", type=int, default=None, help="for smoke checks only")
    ap.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    add_location_args(ap, __file__, "dcube")
    args = ap.parse_args(argv)
    if (args.finished_only or args.arms) and not args.ablation_only:
        ap.error("--finished-only and --arms report the ablation tables only: add --ablation-only")
    return args


def main() -> None:
    args = parse_args()
    restore_dcube_records(args)
    results: dict = {"settings": settings_of(args)}
    md = ["# D-Cube vs ResNet-18 and DiffMIC-v2\n"]
    if not args.ablation_only:
        for dataset in args.datasets:
            results[dataset], text = compare_dataset(args, dataset)
            md.append(text)
            write_results(args.out, "results", results, "\n".join(md))  # partial results survive a kill
    if not args.no_ablation:
        results["ablation"], text = ablations(args, args.datasets[0])
        md.append(text)
    write_results(args.out, "results", results, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
