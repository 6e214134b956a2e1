"""A method of the full benchmark rerun with changed options, on the same protocol, against its recorded runs.

For each seed, the full benchmark's record of ``--method`` (``benchmarks/results/full/<dataset>/runs/<method>-sN``)
gives the run's config; the ``--set`` overrides change it, and the variant is trained (resumed after a kill, or read
back from its own record) in the work folder. It is compared on the same test images with the recorded method, with
the recorded baseline and with any recorded method named by ``--also``: mean +- std over seeds, each seed's 95%
bootstrap CI, paired bootstrap per seed, cost. The variant's records go to ``<out>/<dataset>/variants/<tag>/runs/``
and its table, of every seed finished so far (so one-seed calls run in parallel and the last one's table has them
all), to ``<out>/<dataset>/variants/<tag>.{json,md}``; ``--finished-only`` trains nothing and writes it.

    python benchmarks/variant.py --dataset retinamnist --method diffmic_v2 --tag dcg-features \\
        --set method.params.feature_encoders=dcg --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmed.bench import (GENERATOR_DONE, RUN_RECORD, add_location_args, cost_ratio, dataset_overrides, fmt,
                           keep_record, markdown_table, paired, per_seed_ci, pvalue_cells, restore_records,
                           run_or_resume, settings_of, summarize, write_results)
from diffmed.config import load_config

PAIRED = ("acc", "balanced_acc", "f1_macro", "auc")
METRICS = (*PAIRED, "ece")
DONE = "metrics.json"


def variant_runs(args: argparse.Namespace, tag: str) -> Path:
    """The runs folder of variant ``tag`` of ``--method``, under ``--out`` or ``--work``."""
    return Path(args.dataset) / "variants" / tag / "runs"


def recorded(args: argparse.Namespace, name: str, seed: int) -> Path:
    """The record of a full-benchmark method, or of another variant (by its tag) of ``--method``."""
    other_variant = args.out / variant_runs(args, name)
    if name != args.tag and other_variant.is_dir():
        return other_variant / f"{args.method}-s{seed}"
    return args.out / args.dataset / "runs" / f"{name}-s{seed}"


def variant_dir(args: argparse.Namespace, seed: int) -> tuple[Path, Path]:
    """(work folder, record) of the variant's run for ``seed``."""
    name = variant_runs(args, args.tag) / f"{args.method}-s{seed}"
    return args.work / name, args.out / name


def run_variant(args: argparse.Namespace, seed: int) -> None:
    source = recorded(args, args.method, seed) / "config.yaml"
    if not source.is_file():
        raise SystemExit(f"no recorded run {source.parent}: run benchmarks/full.py --datasets {args.dataset} first")
    cfg = load_config(source, [*dataset_overrides(args.dataset, args.data_dir), *args.set])
    run_dir, record = variant_dir(args, seed)
    run_or_resume(cfg, run_dir)
    keep_record(run_dir, record, RUN_RECORD, DONE)


def finished_seeds(args: argparse.Namespace) -> list[int]:
    """Seeds of every finished run of the variant, this call's and earlier ones'."""
    runs = args.work / variant_runs(args, args.tag)
    return sorted(int(d.name.rpartition("-s")[2]) for d in runs.glob(f"{args.method}-s*") if (d / DONE).is_file())


def table(args: argparse.Namespace, seeds: list[int]) -> tuple[dict, str]:
    def read(dirs):
        return [json.loads((d / DONE).read_text()) for d in dirs]

    label = f"{args.method} ({args.tag})"
    references = list(dict.fromkeys(["baseline", *args.also, args.method]))
    dirs = {ref: [recorded(args, ref, s) for s in seeds] for ref in references}
    missing = [d for ref in references for d in dirs[ref] if not (d / DONE).is_file()]
    if missing:
        raise SystemExit(f"no finished record {missing[0]} for the table of seeds {seeds}: run that method or "
                         "variant for those seeds first, or drop it from --also")
    dirs[label] = [variant_dir(args, s)[0] for s in seeds]
    runs = {arm: read(d) for arm, d in dirs.items()}
    summary = {arm: summarize(r, METRICS) for arm, r in runs.items()}
    base = summary["baseline"]
    rows = [[arm, *(fmt(s[m]) for m in METRICS), per_seed_ci(s, "f1_macro"),
             "; ".join(f"{r['val'].get('auc', float('nan')):.3f}" for r in runs[arm]),
             cost_ratio(s, base, "infer_seconds_per_image"), cost_ratio(s, base, "forward_passes_per_image"),
             f"{s['cost'].get('train_seconds', float('nan')) + s['cost'].get('stage_seconds', 0):.0f}"]
            for arm, s in summary.items()]
    versus = {ref: paired(dirs[label], dirs[ref], PAIRED, args.n_boot) for ref in reversed(references)}
    md = [f"# {label} on {args.dataset}: {' '.join(args.set)}\n",
          f"Seeds {seeds}; the {', '.join(references)} rows are recorded runs of the same seeds (of the full "
          f"benchmark, or of the variant with that tag), the variant is {args.method}'s config with the overrides "
          "above.\n",
          markdown_table(["arm", *METRICS, "macro-F1 95% CI per seed", "val AUC per seed (selection)",
                          "s / image (x baseline)", "forward passes / image (x baseline)",
                          "train s (with stages)"], rows),
          "Paired bootstrap of the variant against each reference, per seed (diff, p):\n",
          markdown_table(["variant minus", *PAIRED], [[ref, *pvalue_cells(c, PAIRED)] for ref, c in versus.items()])]
    return {"seeds": seeds, "summaries": summary, "paired": versus}, "\n".join(md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="a dataset of the full benchmark (e.g. retinamnist, ham10000)")
    ap.add_argument("--method", required=True, help="the recorded method whose runs are varied")
    ap.add_argument("--tag", required=True, help="short name of the variant (folder and table names)")
    ap.add_argument("--set", nargs="+", required=True, help="key=value config overrides that make the variant")
    ap.add_argument("--also", nargs="+", default=[],
                    help="more recorded methods, or variants of --method by tag, to compare with (e.g. "
                         "class_weighted, fs-ce-only); baseline and --method always")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--finished-only", action="store_true", help="train nothing; write the table")
    ap.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    add_location_args(ap, __file__, "full", "benchmark-full")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    variants = variant_runs(args, args.tag)
    restore_records(args.out / variants, args.work / variants, "*-s*", DONE)
    # a recorded config's generator_run (D-Cube, rebalancing) points at the full benchmark's generator stage
    stages = Path(args.dataset) / "stages"
    restore_records(args.out / stages, args.work / stages, "generator-s*", GENERATOR_DONE)
    if not args.finished_only:
        for seed in args.seeds:
            run_variant(args, seed)
    seeds = finished_seeds(args)
    if not seeds:
        raise SystemExit(f"no finished {args.tag} run of {args.method} on {args.dataset}: run it without "
                         "--finished-only")
    results, md = table(args, seeds)
    results["settings"] = settings_of(args)
    write_results(args.out / args.dataset / "variants", args.tag, results, md)
    print(md)


if __name__ == "__main__":
    main()
