"""DiffMIC-v2 against the ResNet-18 baseline, several seeds, and the Table IV ablation (c1-c6 + full).

Every run is an ordinary run folder trained by ``diffmed.engine.run.train`` (the DCG stage included); finished
runs (``metrics.json`` present) are read back, killed ones resumed. Each finished run's record (config, metrics,
test predictions, model contract, the DCG prior's test metrics and any inference sweep) is kept under
``--out``/records/<dataset> and put back into an empty work folder, so the committed records carry the tables
across sessions without weights (the prior's metrics are computed as soon as a run finishes). Both methods see the same data, split,
augmentation, optimiser, batch size and epochs; models are chosen on validation AUC. The tables give the mean
+- std over seeds of the test metrics, each seed's 95% bootstrap CI, paired bootstrap p-values (DiffMIC-v2
minus baseline, same test images) and the inference cost relative to the baseline.

    python benchmarks/diffmic.py --datasets pneumoniamnist retinamnist ham10000 --seeds 0 1 2 --epochs 50
    python benchmarks/diffmic.py --ablation --seeds 0 1 2 --epochs 50          # Table IV on PneumoniaMNIST
    # smoke check (minutes on CPU):
    python benchmarks/diffmic.py --datasets pneumoniamnist --seeds 0 --epochs 1 --limit-train-batches 2 \\
        --set eval.bootstrap=50 --out /tmp/diffmic_smoke --work /tmp/diffmic_smoke/work
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from diffmed.bench import (RUN_RECORD, add_location_args, cost_ratio, dataset_overrides, fmt, keep_record,
                           markdown_table, mean_std, paired, per_seed_ci, pvalue_cells, read_json, restore_records,
                           run_or_resume, settings_of, summarize, weighted_run, write_results)
from diffmed.engine.checkpoint import atomic_write_json
from diffmed.methods.diffmic.method import DCG_WEIGHTS, VARIANTS

METRICS = ("acc", "auc", "f1_macro", "balanced_acc")
ABLATIONS = ("full", "c1", "c2", "c3", "c4", "c5", "c6")
"""In run order: ``full`` first, so the rows with a DCG reuse its stage."""
TABLE_IV = {  # the paper's PMG2000 rows (Accuracy, F1), for orientation only: a different dataset
    "c1": (0.879, 0.881), "c2": (0.906, 0.899), "c3": (0.915, 0.910), "c4": (0.917, 0.912),
    "c5": (0.913, 0.905), "c6": (0.927, 0.925), "full": (0.935, 0.933),
}
ROW = {
    "c1": "no diffusion (raw-image encoder + linear head)", "c2": "vanilla diffusion, raw image embedding",
    "c3": "c2 + global prior", "c4": "c2 + local prior", "c5": "vanilla diffusion, feature prior F",
    "c6": "F + dense guidance map M (vanilla)", "full": "F + M + heterologous diffusion",
}


def parse_epochs(values: list[str], datasets: list[str]) -> dict[str, int]:
    """``--epochs 20`` for every dataset, or ``--epochs pneumoniamnist=20 retinamnist=40``."""
    if len(values) == 1 and "=" not in values[0]:
        return {d: int(values[0]) for d in datasets}
    pairs = dict(v.split("=", 1) for v in values)
    missing = [d for d in datasets if d not in pairs]
    if missing:
        raise SystemExit(f"--epochs gives no value for {missing}")
    return {d: int(pairs[d]) for d in datasets}


def common_overrides(args: argparse.Namespace, dataset: str, epochs: int, seed: int) -> list[str]:
    extra = [f"train.limit_train_batches={args.limit_train_batches}"] if args.limit_train_batches else []
    return [*dataset_overrides(dataset, args.data_dir), f"train.max_epochs={epochs}", f"train.seed={seed}",
            f"train.batch_size={args.batch_size}", f"optim.lr={args.lr}", "optim.schedule=cosine",
            f"augment.policy={args.augment}", "train.monitor=val/auc", "train.progress=false", *extra, *args.set]


def method_overrides(tag: str, args: argparse.Namespace, epochs: int) -> list[str]:
    """``baseline`` (ResNet-18) or a DiffMIC-v2 ablation row (``full`` is the method itself)."""
    if tag == "baseline":
        return ["method.name=baseline", "method.params.backbone=resnet18"]
    dcg_epochs = args.dcg_epochs or epochs
    return ["method.name=diffmic_v2", f"method.params.ablation={tag}", f"method.params.dcg_epochs={dcg_epochs}",
            f"method.params.n_samples={args.n_samples}"]


def run_dir_of(args: argparse.Namespace, dataset: str, tag: str, epochs: int, seed: int) -> Path:
    return args.work / dataset / f"{tag}-e{epochs}-s{seed}"


def share_dcg_stage(args: argparse.Namespace, dataset: str, tag: str, epochs: int, seed: int) -> None:
    """Ablation rows with a DCG reuse the full run's trained DCG (same seed, data and epochs: the same stage)."""
    source = run_dir_of(args, dataset, "full", epochs, seed) / "stages" / "dcg" / DCG_WEIGHTS
    target = run_dir_of(args, dataset, tag, epochs, seed) / "stages" / "dcg" / DCG_WEIGHTS
    if VARIANTS[tag].needs_dcg and source.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


PRIOR_ALONE = "prior_alone.json"
RECORD = (*RUN_RECORD, PRIOR_ALONE, "sweep.json")
"""What of a finished run the tables read (no weights)."""


def record_of(args: argparse.Namespace, run_dir: Path) -> Path:
    return args.out / "records" / run_dir.relative_to(args.work)




def restore_diffmic_records(args: argparse.Namespace) -> None:
    """Put the committed records of finished runs back into the work folder, where the tables read them."""
    restore_records(args.out / "records", args.work, "*/*-s*", "metrics.json")


def run(args: argparse.Namespace, dataset: str, tag: str, epochs: int, seed: int) -> tuple[dict, Path]:
    run_dir = run_dir_of(args, dataset, tag, epochs, seed)
    if tag not in ("baseline", "full"):
        share_dcg_stage(args, dataset, tag, epochs, seed)
    overrides = common_overrides(args, dataset, epochs, seed) + method_overrides(tag, args, epochs)
    metrics = run_or_resume(overrides, run_dir)
    if tag == "full":
        prior_alone(run_dir)  # while the weights are here: the record keeps none
    keep_record(run_dir, record_of(args, run_dir), RECORD, "metrics.json")
    return metrics, run_dir


RETRAIN = "delete that folder and its record under --out/records to train it again"


def method_rows(name: str, s: dict, base: dict) -> list[str]:
    return [name, *(fmt(s[m]) for m in METRICS), per_seed_ci(s, "acc"), per_seed_ci(s, "auc"),
            cost_ratio(s, base, "forward_passes_per_image"), cost_ratio(s, base, "infer_seconds_per_image"),
            *(f"{s['cost'].get(k, float('nan')):.0f}" for k in ("train_seconds", "stage_seconds"))]


HEADER = ["method", "test ACC", "test AUC", "macro-F1", "balanced ACC", "ACC 95% CI per seed",
          "AUC 95% CI per seed", "forward passes / image (x baseline)", "s / image (x baseline)", "train s",
          "stage s (DCG)"]


def seeds_to_report(args: argparse.Namespace, dataset: str, tags: tuple[str, ...], epochs: int) -> list[int]:
    """``--seeds``, or with ``--finished-only`` those whose runs of every tag are finished."""
    if not args.finished_only:
        return list(args.seeds)
    return [s for s in args.seeds
            if all((run_dir_of(args, dataset, t, epochs, s) / "metrics.json").is_file() for t in tags)]


SWEEP = {  # inference settings re-read from the same trained runs (``--sweep``); the first is the default
    "shared noise, 1 chain, 10 steps (default)": {},
    "per-image noise, 1 chain, 10 steps": {"start": "per_image"},
    "per-image noise, 4 chains, 10 steps": {"start": "per_image", "n_samples": 4},
    "shared noise, 1 chain, 50 steps": {"inference_steps": 50},
    "per-image noise, 4 chains, 20 steps": {"start": "per_image", "n_samples": 4, "inference_steps": 20},
}
SWEEP_METRICS = ("acc", "auc", "f1_macro")
PRIOR_SPLITS = ("train", "val", "test")


@torch.no_grad()
def split_metrics(method, cfg, data, split: str, prior_only: bool = False) -> dict:
    """Metrics of a trained DiffMIC-v2 on ``split``: its sampled prediction, or the DCG prior M alone (M averaged
    over the map; what the denoiser adds is the difference)."""
    from diffmed.engine.data import make_datamodule
    from diffmed.evaluation.metrics import classification_metrics

    probs, targets = [], []
    for batch in make_datamodule(cfg, data).eval_loader(split):
        if prior_only:
            prior = method.condition(batch["image"]).prior.mean((2, 3))
            probs.append(prior if data.spec.multilabel else prior / prior.sum(1, keepdim=True))
        else:
            probs.append(method.predict_with_uncertainty(batch["image"])[0])
        targets.append(batch["target"])
    m = classification_metrics(data.spec.task, torch.cat(targets).numpy(), torch.cat(probs).numpy())
    return {k: float(m[k]) for k in METRICS}


def prior_alone(run_dir: Path) -> dict:
    """Test metrics of the DCG prior M alone (kept in the run folder: computed once, while the weights exist)."""
    cache = run_dir / PRIOR_ALONE
    if not cache.is_file():
        method, _, cfg, data = weighted_run(run_dir, "the DCG prior's metrics", RETRAIN)
        atomic_write_json(cache, split_metrics(method, cfg, data, "test", prior_only=True))
    return json.loads(cache.read_text())


def sweep_run(run_dir: Path) -> dict[str, dict]:
    """{setting: {"val": metrics, "test": metrics}} of one finished run, and the prior M alone; kept in the run
    folder (``sweep.json``): each setting and split is computed once, a new one only when it is missing."""
    cache = run_dir / "sweep.json"
    kept = {"DCG prior M alone", *SWEEP}  # a setting dropped from SWEEP is dropped from the cache too
    out = {k: v for k, v in read_json(cache).items() if k in kept}
    prior = out.get("DCG prior M alone", {})
    if out.keys() == kept and prior.keys() == set(PRIOR_SPLITS):
        return out
    method, _, cfg, data = weighted_run(run_dir, "the inference sweep", RETRAIN)
    # the training split tells whether the frozen DCG memorised its images (then the denoiser learns to copy M)
    out["DCG prior M alone"] = {s: prior.get(s) or split_metrics(method, cfg, data, s, True) for s in PRIOR_SPLITS}
    default = method.params
    for name, update in SWEEP.items():
        if name not in out:
            method.params = default.model_copy(update=update)
            method.sampler.set_timesteps(method.params.inference_steps)
            out[name] = {s: split_metrics(method, cfg, data, s) for s in ("val", "test")}
    atomic_write_json(cache, out)
    return out


def sweep(args: argparse.Namespace, epochs: dict[str, int]) -> tuple[dict, str]:
    """Inference settings of finished full runs, on validation (where a default may be chosen) and test."""
    results, md = {}, ["# DiffMIC-v2 inference settings, same trained runs\n",
                       "Mean over seeds; choose on validation. Denoiser passes per image = chains x steps.\n"]
    header = ["setting", *(f"val {m}" for m in SWEEP_METRICS), *(f"test {m}" for m in SWEEP_METRICS)]
    args.finished_only = True  # the sweep reads finished runs only
    for dataset in args.datasets:
        seeds = seeds_to_report(args, dataset, ("full",), epochs[dataset])
        if not seeds:
            continue
        dirs = [run_dir_of(args, dataset, "full", epochs[dataset], s) for s in seeds]
        per_seed = [sweep_run(d) for d in dirs]
        for d, r in zip(dirs, per_seed):  # the record was kept before the sweep ran
            atomic_write_json(record_of(args, d) / "sweep.json", r)
        results[dataset] = {"seeds": seeds, "per_seed": per_seed}
        rows = [[name, *(f"{mean_std(r[name][split][m] for r in per_seed)[0]:.3f}"
                         for split in ("val", "test") for m in SWEEP_METRICS)] for name in per_seed[0]]
        prior = [[split, *(spread(r["DCG prior M alone"][split][m] for r in per_seed) for m in SWEEP_METRICS)]
                 for split in PRIOR_SPLITS]
        md += [f"## {dataset} ({epochs[dataset]} epochs, seeds {', '.join(map(str, seeds))})\n",
               markdown_table(header, rows), "DCG prior M alone on each split (a memorised training split would "
               "teach the denoiser to copy M):\n", markdown_table(["split", *SWEEP_METRICS], prior), ""]
    return results, "\n".join(md)


def spread(values) -> str:
    """'mean ± std' of per-seed values."""
    mean, std = mean_std(values)
    return fmt({"mean": mean, "std": std})


def prior_row(per_seed: list[dict]) -> list[str]:
    cells = [spread(r[k] for r in per_seed) for k in METRICS]
    return ["DCG prior M alone (same runs)", *cells, *["-"] * (len(HEADER) - 1 - len(METRICS))]


def compare_main(args: argparse.Namespace, epochs: dict[str, int]) -> tuple[dict, str]:
    results, md = {}, ["# DiffMIC-v2 vs ResNet-18 baseline\n"]
    for dataset in args.datasets:
        dirs: dict[str, list[Path]] = {}
        summary: dict[str, dict] = {}
        seeds = seeds_to_report(args, dataset, ("baseline", "full"), epochs[dataset])
        if not seeds:
            continue
        for tag in ("baseline", "full"):
            runs = [run(args, dataset, tag, epochs[dataset], seed) for seed in seeds]
            dirs[tag] = [d for _, d in runs]
            summary[tag] = summarize([m for m, _ in runs], METRICS)
        comparisons = paired(dirs["full"], dirs["baseline"], METRICS, args.n_boot)
        priors = [prior_alone(d) for d in dirs["full"]]
        results[dataset] = {"epochs": epochs[dataset], "baseline": summary["baseline"],
                            "diffmic_v2": summary["full"], "dcg_prior_alone_per_seed": priors,
                            "paired_vs_baseline": comparisons}
        md += [f"## {dataset} ({epochs[dataset]} epochs, {len(seeds)} seeds: {', '.join(map(str, seeds))})\n",
               markdown_table(HEADER, [method_rows("ResNet-18", summary["baseline"], summary["baseline"]),
                                       method_rows("DiffMIC-v2", summary["full"], summary["baseline"]),
                                       prior_row(priors)]),
               "Paired bootstrap, DiffMIC-v2 minus baseline, per seed:\n",
               markdown_table(list(METRICS), [pvalue_cells(comparisons, METRICS)])]
    return results, "\n".join(md)


def ablation(args: argparse.Namespace, epochs: dict[str, int]) -> tuple[dict, str]:
    dataset = args.datasets[0]
    dirs, summary = {}, {}
    seeds = seeds_to_report(args, dataset, ABLATIONS, epochs[dataset])
    for tag in ABLATIONS:
        runs = [run(args, dataset, tag, epochs[dataset], seed) for seed in seeds]
        dirs[tag], summary[tag] = [d for _, d in runs], summarize([m for m, _ in runs], METRICS)
    versus_full = {tag: paired(dirs[tag], dirs["full"], METRICS, args.n_boot) for tag in ABLATIONS if tag != "full"}
    rows = []
    for tag in sorted(ABLATIONS, key=lambda t: (t == "full", t)):
        p = pvalue_cells(versus_full[tag], METRICS) if tag in versus_full else ["—"] * len(METRICS)
        paper = "{:.3f} / {:.3f}".format(*TABLE_IV[tag])
        rows.append([tag, ROW[tag], fmt(summary[tag]["acc"]), fmt(summary[tag]["f1_macro"]),
                     fmt(summary[tag]["auc"]), p[0], p[2], cost_ratio(summary[tag], summary["c1"],
                                                                      "forward_passes_per_image"), paper])
    md = (f"# DiffMIC-v2 ablation (Table IV rows) on {dataset}, {epochs[dataset]} epochs, {len(seeds)} seeds\n\n"
          + markdown_table(["row", "graph", "test ACC", "macro-F1", "test AUC", "ACC minus full (p) per seed",
                            "F1 minus full (p) per seed", "forward passes (x c1)", "paper PMG2000 ACC / F1"], rows))
    return {"dataset": dataset, "epochs": epochs[dataset], "rows": summary, "paired_vs_full": versus_full}, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "retinamnist", "ham10000"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seed ids; run one seed per process in parallel, then the table with all of them")
    ap.add_argument("--epochs", nargs="+", default=["50"], help="N, or dataset=N pairs")
    ap.add_argument("--dcg-epochs", type=int, default=None, help="DCG stage epochs (default: --epochs)")
    ap.add_argument("--n-samples", type=int, default=1, help="DiffMIC-v2 reverse chains per image")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--augment", default="standard", help="augment.policy for every run")
    ap.add_argument("--limit-train-batches", type=int, default=None, help="for smoke checks only")
    ap.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--finished-only", action="store_true",
                    help="tables from the seeds whose runs are all finished; train nothing")
    ap.add_argument("--ablation", action="store_true", help="Table IV rows c1-c6 + full on the first dataset "
                                                            "(default pneumoniamnist)")
    ap.add_argument("--sweep", action="store_true",
                    help="re-read finished full runs under other inference settings (val and test); train nothing")
    add_location_args(ap, __file__, "diffmic")
    args = ap.parse_args()
    if args.ablation and args.datasets == ap.get_default("datasets"):
        args.datasets = ["pneumoniamnist"]
    epochs = parse_epochs(args.epochs, args.datasets)
    restore_diffmic_records(args)
    name, job = (("ablation", ablation) if args.ablation else ("sweep", sweep) if args.sweep
                 else ("results", compare_main))
    results, md = job(args, epochs)
    results["settings"] = settings_of(args)
    write_results(args.out, name, results, md)
    print(md)


if __name__ == "__main__":
    main()
