"""Linear probes on D-Cube's frozen hyper-features: is a weak D-Cube result its head's training or its features?

For each seed of the full benchmark's recorded ``dcube`` run on ``--dataset``, the same generator (the committed
``<out>/<dataset>/stages/generator-sN``), timestep and input give one frozen forward pass per image of the
run's own train/val/test split (no augmentation). Each block's output, cut to the image area, is averaged over
space; the probes are standardised multinomial logistic regressions (scikit-learn) on

* ``selected``: the run's KS-selected blocks (``selected_layers`` of its model.json), i.e. what its head saw;
* ``all``: every block of the generator;
* ``pixels``: the image itself average-pooled to 8x8 (a reference with no diffusion model at all),

each with and without balanced class weights. The inverse regularisation C is chosen on validation macro-F1
(the benchmark's headline metric); test is read once. Two more arms train the fully connected path of D-Cube's
head (``pooled_features``: BatchNorm1d -> Linear -> ReLU -> Linear) on the selected blocks' means with the
recorded run's optimiser, learning-rate schedule, batch size and epochs, and with ``--budget-factor`` times the
epochs (last epoch kept, no selection): does the benchmark's budget let even this small head learn what the
probe finds? The table puts them next to the recorded D-Cube head and
baseline of the same seeds, with a paired bootstrap of each arm's macro-F1 against the baseline's test predictions.
Features are cached per seed in ``--work``.

    python benchmarks/dcube_probe.py --dataset ham10000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from diffmed.bench import (add_location_args, dataset_overrides, fmt, markdown_table, mean_std, settings_of,
                           write_results)
from diffmed.config import RunConfig, load_config
from diffmed.diffusion.generative import load_generator
from diffmed.engine.data import make_datamodule, prepare_data
from diffmed.engine.inference import pick_device
from diffmed.engine.optim import build_optimizer
from diffmed.evaluation.compare import load_predictions, paired_bootstrap
from diffmed.evaluation.metrics import bootstrap_ci, classification_metrics
from diffmed.methods.dcube.features import FrozenDiffusion, seeded_noise

METRICS = ("acc", "balanced_acc", "f1_macro", "auc")
SPLITS = ("train", "val", "test")
FEATURE_SETS = ("selected", "all", "pixels")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PIXEL_SIDE = 8


def record(args: argparse.Namespace, method: str, seed: int) -> Path:
    return args.out / args.dataset / "runs" / f"{method}-s{seed}"


def pooled(frozen: FrozenDiffusion, params: dict, images: torch.Tensor, noise: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-block spatial means (N, C) of one frozen pass, and the 8x8 pooled image."""
    t, device = params["timestep"], frozen.alphas_cumprod.device
    with torch.no_grad():
        feats = frozen.features(frozen.model_input(images.to(device), t, params["input"], noise.to(device)), t)
    out = {name: frozen.crop(f).mean(dim=(-2, -1)).cpu().numpy() for name, f in feats.items()}
    out["pixels"] = torch.nn.functional.adaptive_avg_pool2d(images, PIXEL_SIDE).flatten(1).numpy()
    return out


def extract(args: argparse.Namespace, seed: int) -> dict[str, np.ndarray]:
    """Cached ``{split/block: (N, C)}`` and ``{split/y: (N,)}`` of one seed."""
    cache = args.work / args.dataset / f"dcube_probe_features-s{seed}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    run = record(args, "dcube", seed)
    cfg = load_config(run / "config.yaml", dataset_overrides(args.dataset, args.data_dir))
    params = json.loads((run / "model" / "model.json").read_text())["params"]
    data = prepare_data(cfg, cache.parent / f"dcube_probe-s{seed}")
    dm = make_datamodule(cfg, data)
    generator = load_generator(args.out / args.dataset / "stages" / f"generator-s{seed}")
    frozen = FrozenDiffusion.from_generator(generator).to(pick_device())
    noise = seeded_noise((1, data.spec.channels, data.spec.image_size, data.spec.image_size), params["noise_seed"])
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        parts, ys = [], []
        for batch in dm.eval_loader(split):
            parts.append(pooled(frozen, params, batch["image"], noise))
            ys.append(batch["target"].numpy())
        for name in parts[0]:
            arrays[f"{split}/{name}"] = np.concatenate([p[name] for p in parts])
        arrays[f"{split}/y"] = np.concatenate(ys)
    arrays["selected_layers"] = np.array(params["selected_layers"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def design(arrays: dict[str, np.ndarray], split: str, which: str) -> np.ndarray:
    """The (N, D) probe input of one split: the selected blocks, every block or the pooled pixels."""
    keys = [k.split("/", 1)[1] for k in arrays if k.startswith(f"{split}/")]
    blocks = [k for k in keys if k not in ("y", "pixels")]
    names = {"selected": list(arrays["selected_layers"]), "all": blocks, "pixels": ["pixels"]}[which]
    return np.concatenate([arrays[f"{split}/{n}"] for n in names], axis=1)


def scored(task: str, val: dict, y_test: np.ndarray, probs: np.ndarray, baseline: np.ndarray, seed: int) -> dict:
    """An arm's validation metrics, test metrics with 95% bootstrap CIs, and its test macro-F1 minus the baseline's
    (``baseline``: its test probabilities), paired bootstrap."""
    test = classification_metrics(task, y_test, probs)
    return {"val": {m: val[m] for m in METRICS}, "test": {m: test[m] for m in METRICS},
            "test_ci": bootstrap_ci(task, y_test, probs, METRICS),
            "f1_vs_baseline": paired_bootstrap(task, y_test, probs, baseline, "f1_macro", seed=seed)}


def probe(arrays: dict[str, np.ndarray], which: str, balanced: bool, seed: int, task: str,
          baseline: np.ndarray) -> dict:
    """C chosen on validation macro-F1; the scores of that C."""
    x = {s: design(arrays, s, which) for s in SPLITS}
    y = {s: arrays[f"{s}/y"].astype(int) for s in SPLITS}
    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=c, max_iter=3000, class_weight="balanced" if balanced else None, random_state=seed))
        model.fit(x["train"], y["train"])
        val = classification_metrics(task, y["val"], model.predict_proba(x["val"]))
        if best is None or val["f1_macro"] > best[0]["f1_macro"]:
            best = (val, c, model)
    val, c, model = best
    return {"C": c, "dims": int(x["train"].shape[1]),
            **scored(task, val, y["test"], model.predict_proba(x["test"]), baseline, seed)}


def fc_head(arrays: dict[str, np.ndarray], cfg: RunConfig, hidden: int, epochs: int, seed: int, task: str,
            baseline: np.ndarray) -> dict:
    """The head's fully connected path on the selected blocks' means, trained as the recorded run (``cfg``) trained,
    for ``epochs``."""
    x = {s: torch.as_tensor(design(arrays, s, "selected"), dtype=torch.float32) for s in SPLITS}
    y = {s: torch.as_tensor(arrays[f"{s}/y"].astype(int)) for s in SPLITS}
    classes, batch = baseline.shape[1], cfg.train.batch_size
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(x["train"].shape[1]), torch.nn.Linear(x["train"].shape[1], hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
    opt = build_optimizer(net.parameters(), cfg.optim, epochs)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x["train"])).split(batch):
            if len(idx) < 2:  # BatchNorm1d cannot train on one sample
                continue
            opt["optimizer"].zero_grad()
            F.cross_entropy(net(x["train"][idx]), y["train"][idx]).backward()
            opt["optimizer"].step()
        opt["lr_scheduler"]["scheduler"].step()
    net.eval()
    with torch.no_grad():
        val, probs = (torch.softmax(net(x[s]), 1).numpy() for s in ("val", "test"))
    return {"epochs": epochs, **scored(task, classification_metrics(task, y["val"].numpy(), val),
                                       y["test"].numpy(), probs, baseline, seed)}


def recorded_arm(args: argparse.Namespace, method: str, seed: int, baseline: np.ndarray) -> dict:
    m = json.loads((record(args, method, seed) / "metrics.json").read_text())
    pred = load_predictions(record(args, method, seed))
    return {"val": {k: m["val"].get(k, float("nan")) for k in METRICS}, "test": {k: m["test"][k] for k in METRICS},
            "test_ci": m.get("test_ci", {}),
            "f1_vs_baseline": paired_bootstrap(m["task"], pred.y_true, pred.probs, baseline, "f1_macro", seed=seed)}


def baseline_probs(args: argparse.Namespace, seed: int, y_test: np.ndarray) -> np.ndarray:
    """The recorded baseline's test probabilities, checked to be of the same images in the same order."""
    pred = load_predictions(record(args, "baseline", seed))
    if not np.array_equal(pred.y_true, y_test):
        raise SystemExit(f"{pred.run_dir}: its test targets differ from this split's; is --data-dir the benchmark's?")
    return pred.probs


def arms_of_seed(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    arrays = extract(args, seed)
    run = record(args, "dcube", seed)
    task = json.loads((run / "metrics.json").read_text())["task"]
    base = baseline_probs(args, seed, arrays["test/y"].astype(int))
    arms = {f"{m} (recorded)": recorded_arm(args, m, seed, base) for m in ("baseline", "dcube")}
    for which in FEATURE_SETS:
        for balanced in (False, True):
            arms[f"probe: {which}{', balanced' if balanced else ''}"] = probe(arrays, which, balanced, seed, task,
                                                                              base)
    cfg = load_config(run / "config.yaml")
    hidden = json.loads((run / "model" / "model.json").read_text())["params"]["head_hidden"]
    for epochs in (cfg.train.max_epochs, cfg.train.max_epochs * args.budget_factor):
        arms[f"fc head: run's optimiser, {epochs} epochs"] = fc_head(arrays, cfg, hidden, epochs, seed, task, base)
    return arms


def table(args: argparse.Namespace, per_seed: dict[int, dict[str, dict]]) -> str:
    seeds = list(per_seed)
    rows = []
    for arm in per_seed[seeds[0]]:
        runs = [per_seed[s][arm] for s in seeds]
        stats = {m: dict(zip(("mean", "std"), mean_std(r["test"][m] for r in runs))) for m in METRICS}
        ci = "; ".join(f"[{r['test_ci']['f1_macro']['low']:.3f}, {r['test_ci']['f1_macro']['high']:.3f}]"
                       for r in runs if "f1_macro" in r["test_ci"])
        val = "; ".join(f"{r['val']['f1_macro']:.3f}" for r in runs)
        versus = "; ".join(f"{r['f1_vs_baseline']['diff']:+.3f} (p={r['f1_vs_baseline']['p_value']:.3f})"
                           for r in runs)
        extra = "; ".join(f"{r['dims']} / {r['C']:g}" for r in runs) if "C" in runs[0] else "-"
        rows.append([arm, *(fmt(stats[m]) for m in METRICS), ci, versus, val, extra])
    return "\n".join([
        f"# Linear probes on D-Cube's frozen hyper-features: {args.dataset}\n",
        f"Seeds {seeds}; test set of the full benchmark's split. Probes: spatial mean of each block's output at the "
        "recorded run's timestep and input, standardised logistic regression, C chosen on validation macro-F1. "
        "`pixels` is the image pooled to 8x8. `fc head` rows: the fully connected path of D-Cube's head "
        "(pooled_features) on the selected blocks' means, trained with the recorded run's optimiser, schedule and "
        "batch size for its epochs and for more (last epoch). The recorded rows are the full benchmark's runs of the "
        "same seeds.\n",
        markdown_table(["arm", *METRICS, "macro-F1 95% CI per seed", "macro-F1 minus baseline (p) per seed",
                        "val macro-F1 per seed", "dims / C per seed"], rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ham10000", help="a dataset of the full benchmark with recorded dcube runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-factor", type=int, default=4, help="epochs of the longer fc-head arm, x the run's")
    add_location_args(ap, __file__, "full", "benchmark-full")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    per_seed = {s: arms_of_seed(args, s) for s in args.seeds}
    write_results(args.out / args.dataset, "dcube_probe",
                  {"settings": settings_of(args), "seeds": {str(s): a for s, a in per_seed.items()}},
                  table(args, per_seed))
    print((args.out / args.dataset / "dcube_probe.md").read_text())


if __name__ == "__main__":
    main()
