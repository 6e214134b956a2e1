"""ResNet-18 (28 px) baseline on PneumoniaMNIST and RetinaMNIST under the MedMNIST protocol, several seeds.

MedMNIST v2 protocol: from scratch, CIFAR-style stem, Adam lr 1e-3, batch 128, lr x0.1 at 50% and 75%
of training, model chosen on validation AUC. The paper trains 100 epochs; on 2 CPU cores we train
``--epochs`` (recorded in the results) with the same schedule shape.

    python benchmarks/baseline_medmnist.py --seeds 0 1 2 --epochs pneumoniamnist=8 retinamnist=15
"""
from __future__ import annotations

import argparse

from diffmed.bench import (add_location_args, dataset_overrides, fmt, markdown_table, per_seed_ci, run_or_resume,
                           save_configs, summarize, write_results)

PAPER = {  # MedMNIST v2, Table 3, ResNet-18 (28): (ACC, AUC)
    "pneumoniamnist": (0.854, 0.944),
    "retinamnist": (0.524, 0.717),
}


NOTE = ("Test split, mean ± std over seeds; per-seed 95% bootstrap CIs (1000 resamples); model chosen on "
        "validation AUC. Throughput and peak memory (process RSS) were measured on a shared 2-core CPU.\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(PAPER))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", nargs="+", default=["pneumoniamnist=8", "retinamnist=15"],
                    help="dataset=epochs pairs")
    add_location_args(ap, __file__, "baseline_medmnist")
    args = ap.parse_args()
    epochs = {k: int(v) for k, v in (e.split("=") for e in args.epochs)}

    results, rows, run_dirs = {}, [], []
    for name in args.datasets:
        runs = []
        for seed in args.seeds:
            run_dirs.append(args.work / f"{name}-s{seed}")
            overrides = [*dataset_overrides(name, args.data_dir), "method.name=baseline",
                         "method.params.backbone=resnet18", f"train.max_epochs={epochs[name]}",
                         f"train.seed={seed}", "train.monitor=val/auc", "train.progress=false"]
            runs.append(run_or_resume(overrides, run_dirs[-1]))
        s = summarize(runs)
        s["epochs"] = epochs[name]
        s["per_seed"] = {r["seed"]: {m: r["test"][m] for m in ("acc", "auc")} for r in runs}
        results[name] = s
        paper_acc, paper_auc = PAPER.get(name, (float("nan"), float("nan")))
        rows.append([name, epochs[name], len(runs), fmt(s["acc"]), per_seed_ci(s, "acc"), fmt(s["auc"]),
                     per_seed_ci(s, "auc"),
                     f"{paper_acc:.3f} / {paper_auc:.3f}", f"{s['cost']['train_images_per_second']:.0f}",
                     f"{s['cost']['peak_memory_mb']:.0f}"])
    md = "# ResNet-18 (28 px) baseline, MedMNIST protocol\n\n" + NOTE + markdown_table(
        ["dataset", "epochs", "seeds", "test ACC", "ACC 95% CI per seed", "test AUC", "AUC 95% CI per seed",
         "paper ResNet-18 (28) ACC / AUC", "train img/s", "peak MB"], rows)
    write_results(args.out, "results", results, md)
    save_configs(run_dirs, args.out)
    print(md)


if __name__ == "__main__":
    main()
