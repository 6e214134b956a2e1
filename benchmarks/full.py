"""The `full` benchmark behind the README's main table: `diffmed benchmark --budget full` on the project's four
datasets, and one table across them next to the published numbers.

Each dataset is an ordinary resumable `diffmed benchmark` folder under ``--work`` (rerun to resume; finished runs
are read back). Each finished run's record (what the report reads of it: config, metrics, test predictions, the
first seed's pictures; no classifier weights) and each generator stage's exported weights (D-Cube reads them) are
kept under ``--out``/<dataset>, and the report is written there from the records. An empty work folder gets the
records back, so the committed records carry a benchmark across machines and sessions: only the missing runs are
trained. ``--finished-only`` trains nothing and reports, per dataset, the seeds whose runs of every method have
finished (before any has, the largest complete grid of finished runs, marked partial), so a partly done benchmark can be
committed as it stands. ``results.md`` covers all four datasets: one not passed is read from its committed report.

    python benchmarks/full.py --datasets pneumoniamnist --seeds 3            # train (or resume) and report
    python benchmarks/full.py --finished-only                                 # report what has finished
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmed.bench import (GENERATOR_RECORD, RUN_RECORD, add_location_args, dataset_overrides, keep_record,
                           markdown_table, restore_record)
from diffmed.benchmark import BUDGETS, data_overrides, write_report
from diffmed.benchmark.arms import check_finished_runs, parse_methods, plan_jobs
from diffmed.benchmark.report import collect, seed_cell
from diffmed.benchmark.runner import Job, pending_jobs, run_jobs

DATASETS = ("pneumoniamnist", "pneumoniamnist_imbalanced", "retinamnist", "ham10000")
PUBLISHED = {  # ../shared/data/README.md: MedMNIST v2 Table 3 ResNet-18 (28 px, 100 epochs), ACC / AUC
    "pneumoniamnist": "MedMNIST v2 ResNet-18 (28): ACC 0.854, AUC 0.944; ResNet-50 (224): 0.884 / 0.962; "
                      "MedMNIST+ ResNet-18 (28, ImageNet-pretrained): 0.831 / 0.950",
    "retinamnist": "MedMNIST v2 ResNet-18 (28): ACC 0.524, AUC 0.717; ResNet-50 (28): 0.528 / 0.726; "
                   "MedMNIST+ ResNet-18 (28, ImageNet-pretrained): 0.523 / 0.704",
    "pneumoniamnist_imbalanced": "no published numbers (a project subset: 388 of the 1214 normal training images)",
    "ham10000": "no published numbers at 64 px (the DiffMIC papers report 224 px with pretrained encoders)",
}
SHOWN = ("acc", "balanced_acc", "f1_macro", "auc")
BALANCE_TO = {"ham10000": 0.25}
"""Datasets whose synthetic images fill each class to a smaller share of the largest than the budget's. HAM10000's
nv class is 72 % of the images: filling the six others to it would take about 26k images per seed (3.5 h of
sampling and 3 h of training on one core), five times the real training set."""
METHOD_PARAMS = {"ham10000": {"diffusion_classifier": {"vae_width": 16, "vae_epochs": 10}}}
"""Per-dataset method settings on top of the budget's. HAM10000 is the only set above 32 px, so the only one whose
diffusion classifier trains a VAE: at the default width 32 for 20 epochs its pre-training stages took 10,602 s of a
3-hour run on one core (seed 0's record at commit 1512dc7), at width 16 for 10 epochs 2,922 s. Chosen for cost,
before any run with it was seen."""


PICTURES = ("plots/*.png", "**/gaussianity.png", "**/*trajectory*.png", "**/*gradcam*.png", "**/samples/*.png")
"""The report shows each method's first seed's pictures (and its generator's samples), so only those are kept."""


def _record_patterns(job) -> tuple[str, ...]:
    """What of a job is kept: a run's record, a generator's weights, nothing of other stages."""
    if job.name.startswith("generator-"):
        kept = GENERATOR_RECORD
    elif job.done == "metrics.json":
        kept = RUN_RECORD
    else:
        return ()
    return (*kept, *PICTURES) if job.name.endswith("-s0") else kept


def keep_records(plan: dict, records: Path) -> None:
    """Copy the record of every finished job to ``records`` (once: a complete record is left as it is)."""
    for job in plan["jobs"]:
        patterns = _record_patterns(job)
        if patterns and job.finished:
            keep_record(job.out, in_records(records, job.out), patterns, job.done)


def restore_records(plan: dict, records: Path) -> None:
    """Put the committed records of finished jobs into the work folder, where the benchmark reads them back."""
    for job in plan["jobs"]:
        if not job.finished:
            restore_record(in_records(records, job.out), job.out, job.done)


def reported(plan: dict) -> tuple[list[int], list[str]]:
    """Seeds and methods to report: the complete grid of finished runs with the most runs (seeds x methods, the
    baseline among them; more methods on a tie), either every method on the seeds where all have finished or the
    first n seeds with the methods finished on all of them. The table names the missing methods and shows each on
    the seeds it has (``unfinished_rows``)."""
    done = {job.out for job in plan["jobs"] if job.finished}
    runs = plan["runs"]
    n_seeds = len(runs["baseline"])
    complete = [i for i in range(n_seeds) if all(dirs[i] in done for dirs in runs.values())]
    grids = [(len(complete) * len(runs), len(runs), complete, list(runs))] if complete else []
    for n in range(1, n_seeds + 1):
        methods = [m for m, dirs in runs.items() if all(d in done for d in dirs[:n])]
        if "baseline" in methods:
            grids.append((n * len(methods), len(methods), list(range(n)), methods))
    return max(grids)[2:] if grids else ([], [])


def in_records(dest: Path, run_dir: Path) -> Path:
    """Where a work folder's run is kept among a dataset's records."""
    return dest / run_dir.parent.name / run_dir.name


def unfinished_rows(plan: dict, dest: Path, shown: list[str]) -> dict[str, dict]:
    """Each method left out of the table, over the seeds it has finished, against the baseline of those seeds."""
    done = {job.out for job in plan["jobs"] if job.finished}
    base, rows = plan["runs"]["baseline"], {}
    for m, dirs in plan["runs"].items():
        seeds = [i for i, d in enumerate(dirs) if d in done and base[i] in done]
        if seeds and m not in shown:
            runs = {k: [in_records(dest, plan["runs"][k][i]) for i in seeds] for k in ("baseline", m)}
            rows[m] = {"seeds": seeds, **collect(runs, n_boot=1000)["methods"][m]}
    return rows


def report(plan: dict, work: Path, out: Path, methods: list[str]) -> dict | None:
    """Keep the finished jobs' records in ``out``/<dataset>; write the report of the reported runs from them."""
    dest = out / work.name
    keep_records(plan, dest)
    seeds, shown = reported(plan)
    if not seeds:
        return None
    runs = {m: [in_records(dest, plan["runs"][m][i]) for i in seeds] for m in shown}
    result, _, _ = write_report(dest, runs, "full", shown, {"unfinished": unfinished_rows(plan, dest, shown)})
    return with_missing(result, methods)


def with_missing(result: dict, methods: list[str]) -> dict:
    result["missing"] = [m for m in methods if m not in result["methods"]]
    return result


def committed_results(out: Path, methods: list[str]) -> dict[str, dict]:
    """The last committed report of each dataset, so that results.md always covers all four."""
    found = {name: out / name / "benchmark.json" for name in DATASETS}
    return {name: with_missing(json.loads(f.read_text()), methods) for name, f in found.items() if f.is_file()}


def selected_jobs(plan: dict, methods: list[str]) -> list[Job]:
    """The runs of ``methods`` and the stages they need, so ``--methods`` picks what to train while the report
    still shows every method."""
    by_name = {j.name: j for j in plan["jobs"]}
    chosen = {d for m in methods for d in plan["runs"][m]}
    todo, keep = [j for j in plan["jobs"] if j.out in chosen], set()
    while todo:
        job = todo.pop()
        if job.name not in keep:
            keep.add(job.name)
            todo += [by_name[a] for a in job.after]
    return [j for j in plan["jobs"] if j.name in keep]


def differences(test: dict, metrics: tuple[str, ...] = ("f1_macro", "auc")) -> str:
    return "; ".join(f"{k} {test[k]['diff']:+.3f} (p={test[k]['p_value']:.3g})" for k in metrics)


def vs_baseline(entry: dict) -> str:
    return differences(entry["vs_baseline"]) if "vs_baseline" in entry else "—"


def row_cells(entry: dict, shown: list[str]) -> list[str]:
    return [*(seed_cell(entry["metrics"][k]) for k in shown), vs_baseline(entry),
            f"{entry['cost']['infer_seconds_per_image'] * 1e3:.1f}", f"{entry['cost']['train_seconds']:.0f}"]


def table(results: dict[str, dict]) -> str:
    b = BUDGETS["full"]
    parts = [f"Budget `full`: classifier epochs {b.epochs}, generator {b.generator}, {b.generate_steps} sampling "
             f"steps, synthetic images fill every class to {b.balance_to:g} x the largest "
             f"({', '.join(f'{n}: {v:g} x' for n, v in BALANCE_TO.items())}), method settings "
             f"{b.method_params} (per dataset: {METHOD_PARAMS}); test split, each cell mean ± std over seeds "
             "[95% bootstrap CI of the seed mean]; "
             "model chosen on validation only. \"vs baseline\" is the seed-mean difference to the baseline with its "
             "paired bootstrap p-value (a line \"A vs B\" under a table: A's paired difference to B); \"train s\" "
             "the main fit's wall-clock seconds (stages such as the generator not included) on a machine shared with "
             "the runs beside it (here 2 CPU cores, two runs at once), so it moves with them.\n"]
    for name, result in results.items():
        parts.append(f"## {name} (seeds {result['seeds']})\n\nPublished: {PUBLISHED[name]}.\n")
        if result["missing"]:
            parts.append(f"Partial: the largest complete grid of finished runs, the methods finished on seeds "
                         f"{result['seeds']}, without {', '.join(result['missing'])} (not finished on all of them yet)."
                         "\n")
        shown = [*SHOWN, *(k for k in ("kappa_quadratic",) if k in result["methods"]["baseline"]["metrics"])]
        header = [*shown, "vs baseline", "ms / test image", "train s"]
        rows = [[m, *row_cells(e, shown)] for m, e in result["methods"].items()]
        parts.append(markdown_table(["method", *header], rows))
        if result.get("unfinished"):
            parts.append("Not finished on those seeds yet, each on the seeds it has (vs baseline: the baseline's runs "
                         "of the same seeds):\n")
            rows = [[m, str(e["seeds"]), *row_cells(e, shown)] for m, e in result["unfinished"].items()]
            parts.append(markdown_table(["method", "seeds", *header], rows))
        parts += [f"{pair}: {differences(test, ('balanced_acc', 'f1_macro', 'auc'))}.\n"
                  for pair, test in result.get("contrasts", {}).items()]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--seeds", type=int, default=BUDGETS["full"].seeds, help="seeds per method")
    ap.add_argument("--methods", default="all", help="the runs to train (with the stages they need); the report "
                    "shows every finished method")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    ap.add_argument("--finished-only", action="store_true", help="train nothing; report the finished seeds")
    add_location_args(ap, __file__, "full", "benchmark-full")
    args = ap.parse_args()
    methods, every = parse_methods(args.methods), parse_methods("all")
    results = committed_results(args.out, every)
    for name in args.datasets:
        work = args.work / name
        # the benchmark reads a HAM10000-style folder's columns itself
        data = data_overrides(dataset_overrides(name, args.data_dir)[0].split("=", 1)[1], [])
        plan = plan_jobs(every, data, list(range(args.seeds)), BUDGETS["full"], work, BALANCE_TO.get(name),
                         METHOD_PARAMS.get(name))
        restore_records(plan, args.out / name)
        check_finished_runs(plan["jobs"])
        if not args.finished_only:
            run_jobs(selected_jobs(plan, methods), workers=args.jobs)
        result = report(plan, work, args.out, every)
        left = [j.name for j in pending_jobs(plan["jobs"])]
        print(f"{name}: {'nothing to report' if result is None else 'reported'}; to run: {', '.join(left) or 'nothing'}")
        if result is not None:
            results[name] = result
    if results:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table({n: results[n] for n in DATASETS if n in results}))
        print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
