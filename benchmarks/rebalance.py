"""Synthetic rebalancing versus traditional augmentation on imbalanced PneumoniaMNIST (thesis Tables 11-15).

Data: ``pneumoniamnist_imbalanced.npz`` (train 388 normal vs 3494 pneumonia, official val/test). The same
classifier (ResNet-18, 28 px, method ``baseline``, MedMNIST schedule) is trained in every arm, per seed:

  a  none                 real training images only
  b  weighted             class-weighted loss (method.params.class_weighting=true)
  c  trad-<strategy>      traditional augmentation (the thesis's combined policy), offline
  d  diff-<strategy>      images from the class-conditional diffusion model (L_Gen = L_Diff + L_Cont)
  e  mixed-<strategy>     each planned image traditional or diffusion with probability 0.5 (thesis 4.5)
  f  dcube                D-Cube (issue 5) on the hyper-features of the same seed's generator, real images only
     dcube-worst          the same on the most Gaussian blocks (D-Cube's Table VI)
     dcube-weighted       D-Cube with arm b's inverse-frequency weighted loss

with strategies unbalanced | balanced | misclassified (``diffmed.augment.strategies``). The misclassified
strategy uses the arm-a model of the same seed (penultimate features, PCA, distance to the boundary).
Augmented images are written as PNGs + ``manifest.csv`` and mixed into the training split through
``data.synthetic`` -- the one path both producers take. One generator is trained per seed and one pool of
samples (``--pool-sampler``) serves every diffusion arm.

Reported: test balanced accuracy, macro-F1, AUC, Cohen's kappa (mean +- sd over seeds, per-seed 95%
bootstrap CIs); McNemar and paired-bootstrap p-values of every arm against (a) and of (d) against (c);
a generation table per class (FID/KID/precision/recall in the domain feature space, SSIM/PSNR to the
nearest real image) for the generator with and without L_Cont, DDIM vs DDPM sampling, and traditional
augmentation; cost (generator training time, images/s, peak memory).

Resumable: finished runs, generators, sample pools and manifests are reused; killed ones resumed. Each finished
run's record (config, metrics, test predictions), each generator's weights and each seed's misclassified
candidates are kept under ``--out``/records and read back into an empty work folder, so the committed records
carry the benchmark across machines and sessions: only the missing arms are trained. ``--generators-from``
reuses the full benchmark's generators of the same training config instead of training them again.

    python benchmarks/rebalance.py --seeds 0 1 2 --epochs 20 --generator-epochs 200
    python benchmarks/rebalance.py --quick --arms a c          # smoke test of the traditional arms
    python benchmarks/rebalance.py --generators-from benchmarks/results/full/pneumoniamnist_imbalanced/stages
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmed.augment import (MANIFEST, STRATEGIES, AugmentPlan, ManifestProducer, MixedProducer, TraditionalProducer,
                             plan_from_sources, plan_strategy, read_manifest, select_misclassified, write_manifest)
from diffmed.bench import GENERATOR_RECORD as BASE_GENERATOR_RECORD, RUN_RECORD as BASE_RUN_RECORD
from diffmed.bench import (GENERATOR_DONE, add_location_args, check_same_settings, dataset_overrides, fmt, keep_record,
                           markdown_table, per_seed_ci, read_json, record_complete, restore_records, run_or_resume,
                           save_configs, settings_of, summarize, write_results)
from diffmed.config import DataConfig, load_config
from diffmed.data import load_source
from diffmed.data.types import LabelledSet
from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json
from diffmed.engine.run import CONFIG_FILE, peak_memory_mb

log = logging.getLogger("rebalance")
DATASET = "pneumoniamnist_imbalanced"
METRICS = ("balanced_acc", "f1_macro", "auc", "kappa")
GROUPS = {"a": "no augmentation", "b": "class-weighted loss", "c": "traditional", "d": "diffusion",
          "e": "traditional + diffusion", "f": "D-Cube on the same generator"}
RESNET18 = ("method.name=baseline", "method.params.backbone=resnet18")
SYNTHETIC_COUNT = "synthetic_count.json"
RUN_RECORD = (*BASE_RUN_RECORD, SYNTHETIC_COUNT)
DCUBE_RECORD = (*RUN_RECORD, "stages/dcube_selection.json", "stages/gaussianity/gaussianity.png")
GENERATOR_RECORD = (*BASE_GENERATOR_RECORD, "bench_cost.json")
"""The tiny generator's weights are 2.9 MB; training one again costs 30-40 minutes on a CPU core."""


@dataclass(frozen=True)
class Arm:
    name: str
    group: str
    strategy: str | None = None
    producer: str | None = None
    overrides: tuple[str, ...] = ()
    method: tuple[str, ...] = RESNET18


ARMS = {a.name: a for a in [
    Arm("none", "a"),
    Arm("weighted", "b", overrides=("method.params.class_weighting=true",)),
    *(Arm(f"trad-{s}", "c", s, "traditional") for s in STRATEGIES),
    *(Arm(f"diff-{s}", "d", s, "diffusion") for s in STRATEGIES),
    *(Arm(f"mixed-{s}", "e", s, "mixed") for s in STRATEGIES),
    Arm("dcube", "f", method=("method.name=dcube",)),  # reads the seed's L_Cont generator, trained once
    Arm("dcube-worst", "f", method=("method.name=dcube", "method.params.layers=worst")),  # D-Cube's Table VI
    Arm("dcube-weighted", "f", overrides=("method.params.class_weighting=true",), method=("method.name=dcube",)),
]}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20, help="classifier epochs (MedMNIST schedule shape)")
    ap.add_argument("--generator-epochs", type=int, default=200)
    ap.add_argument("--generator-size", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--generator-batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--generator-lr", type=float, default=2e-4)
    ap.add_argument("--arms", nargs="+", default=["all"], help="arm names or groups a-e (default all)")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--pool-sampler", default="ddim", choices=["ddim", "ddpm"],
                    help="sampler of the images the diffusion arms train on (steps: --ddim-steps / --ddpm-steps)")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--eval-per-class", type=int, default=500,
                    help="generated images per class in the generation table")
    ap.add_argument("--feature-epochs", type=int, default=5, help="epochs of the domain feature extractor")
    ap.add_argument("--no-generation-table", action="store_true")
    ap.add_argument("--generation-only", action="store_true",
                    help="only the generation table of --generation-seeds (generation.{json,md}); trains no arm")
    ap.add_argument("--generation-seeds", nargs="+", type=int, default=None,
                    help="seeds that get the generation table (default: every seed)")
    ap.add_argument("--limit-train-batches", type=float, default=None)
    ap.add_argument("--equal-steps", action="store_true",
                    help="every arm trains as many batches per epoch as arm a (real images only) does, so an "
                         "augmented arm gets the same optimisation budget, on a fresh random subset each epoch")
    ap.add_argument("--no-lcont-ablation", action="store_true",
                    help="leave the generator without L_Cont out of the generation table (saves one generator)")
    ap.add_argument("--prepare-generators", action="store_true",
                    help="only train the seeds' generators and sample their pools, then exit (to run beside arms)")
    ap.add_argument("--generators-from", type=Path, default=None,
                    help="a folder of generator-s<seed> runs (the full benchmark's stages) to reuse where their "
                         "training config equals this benchmark's; others are trained")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--finished-only", action="store_true",
                    help="report the finished runs (each arm over the seeds it has) and train nothing new")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 1 epoch, 2 batches per epoch, tiny generator: checks the pipeline, not the method")
    add_location_args(ap, __file__, "rebalance")
    args = ap.parse_args()
    if args.generation_only:
        args.arms = []  # the pool then holds only the table's images
    if args.quick:
        args.seeds, args.epochs, args.generator_epochs, args.generator_size = args.seeds[:1], 1, 1, "tiny"
        args.limit_train_batches = args.limit_train_batches or 2
        args.eval_per_class, args.feature_epochs, args.bootstrap = 32, 1, 100
        args.ddim_steps, args.ddpm_steps = min(args.ddim_steps, 10), min(args.ddpm_steps, 50)
        args.out = args.out.with_name(args.out.name + "-quick")
        args.work = args.work.with_name(args.work.name + "-quick")
    args.arms = select_arms(args.arms)
    return args


def select_arms(names: list[str]) -> list[str]:
    if "all" in names:
        return list(ARMS)
    out = []
    for n in names:
        picked = [a.name for a in ARMS.values() if a.group == n] if n in GROUPS else [n]
        unknown = [p for p in picked if p not in ARMS]
        if unknown:
            raise SystemExit(f"unknown arm {unknown}; choose from {', '.join(ARMS)} or groups {', '.join(GROUPS)}")
        out += [p for p in picked if p not in out]
    if any(ARMS[a].group != "a" for a in out) and "none" not in out:
        out.insert(0, "none")  # the reference of every comparison (and the misclassified strategy's model)
    return out


# ------------------------------------------------------------------------------------------- pieces
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.npz = args.data_dir / f"{DATASET}.npz"
        full = load_source(DataConfig(source=str(self.npz)))
        self.train = full.subset(full.split == "train")  # the engine's training rows (official split)
        self.records = args.out / "records"
        self.restore_records()

    # --- records ---------------------------------------------------------------------------------
    def restore_records(self) -> None:
        """Put the committed records of finished runs, generators and candidates into the work folder."""
        restore_records(self.records, self.args.work, "runs/*", "metrics.json")
        restore_records(self.records, self.args.work, "generators/*", GENERATOR_DONE)
        for record in (self.records / "aug").glob("candidates-s*.json"):
            if not (self.args.work / "aug" / record.name).is_file():
                atomic_write_json(self.args.work / "aug" / record.name, json.loads(record.read_text()))

    def keep(self, work_path: Path, patterns: tuple[str, ...], done: str) -> None:
        keep_record(work_path, self.records / work_path.relative_to(self.args.work), patterns, done)

    # --- classifier runs ------------------------------------------------------------------------
    def classifier_overrides(self, seed: int) -> list[str]:
        a = self.args
        out = [*dataset_overrides(DATASET, a.data_dir), f"train.max_epochs={a.epochs}", f"train.seed={seed}",
               "train.monitor=val/auc", "train.progress=false", f"eval.bootstrap={a.bootstrap}"]
        return out + self.limit_override(self.real_batches() if self.args.equal_steps else None)

    def real_batches(self) -> int:
        """Batches per epoch of arm a: the real training images at the default batch size."""
        return -(-len(self.train) // load_config(None).train.batch_size)

    def limit_override(self, default: int | None = None) -> list[str]:
        limit = self.args.limit_train_batches or default
        if not limit:
            return []
        return [f"train.limit_train_batches={int(limit) if limit >= 1 else limit}"]

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.args.work / "runs" / f"{arm}-s{seed}"

    def run_arm(self, arm: Arm, seed: int) -> dict:
        """The arm's metrics on this seed: read back when finished (no manifest or pool is made), else trained."""
        run_dir = self.run_dir(arm.name, seed)
        if (run_dir / "metrics.json").is_file():
            check_same_settings(run_dir, load_config(None, self.arm_overrides(arm, seed, build=False)))
        else:
            run_or_resume(self.arm_overrides(arm, seed), run_dir)
            manifest = self.manifest_dir(arm, seed) / MANIFEST if arm.strategy is not None else None
            atomic_write_json(run_dir / SYNTHETIC_COUNT,
                              {"images": sum(1 for _ in manifest.open()) - 1 if manifest else 0})
            if arm.name == "none":  # the record keeps no weights, so select while they are here
                self.candidates(seed)
        self.keep(run_dir, DCUBE_RECORD if arm.group == "f" else RUN_RECORD, "metrics.json")
        return json.loads((run_dir / "metrics.json").read_text())

    def arm_overrides(self, arm: Arm, seed: int, build: bool = True) -> list[str]:
        """The arm's config; ``build`` trains its generator and writes its manifest first if need be (else only
        their paths, to check a finished run's settings)."""
        overrides = self.classifier_overrides(seed) + list(arm.method) + list(arm.overrides)
        if arm.group == "f":
            generator = self.generator(seed) if build else self.generator_dir(seed)
            overrides.append(f"method.params.generator_run={generator}")
        if arm.strategy is not None:
            manifest = self.augmented_manifest(arm, seed) if build else self.manifest_dir(arm, seed) / MANIFEST
            overrides.append(f"data.synthetic=[{manifest}]")
        return overrides

    # --- offline augmentation ----------------------------------------------------------------------
    def candidates(self, seed: int) -> np.ndarray:
        """Misclassified near-boundary training rows of the arm-a model of this seed (cached)."""
        path = self.args.work / "aug" / f"candidates-s{seed}.json"
        if not path.is_file():
            run_dir = self.run_dir("none", seed)
            self.run_arm(ARMS["none"], seed)
            if not path.is_file():  # arm a trained earlier: its weights must still be in the work folder
                if not (run_dir / "model" / "model.safetensors").is_file():
                    raise SystemExit(f"{run_dir} holds arm a's record but not its weights, which the misclassified "
                                     f"strategy reads: delete that folder and {self.records / 'runs' / run_dir.name} "
                                     "to train arm a of this seed again")
                atomic_write_json(path, select_misclassified(run_dir, self.train).to_json())
            atomic_write_bytes(self.records / "aug" / path.name, path.read_bytes())
        return np.asarray(json.loads(path.read_text())["rows"], dtype=np.int64)

    def plan(self, strategy: str, seed: int) -> AugmentPlan:
        cands = self.candidates(seed) if strategy == "misclassified" else None
        return plan_strategy(self.train, strategy, seed=seed, candidates=cands)

    def manifest_dir(self, arm: Arm, seed: int) -> Path:
        return self.args.work / "aug" / f"{arm.producer}-{arm.strategy}-s{seed}"

    def augmented_manifest(self, arm: Arm, seed: int) -> Path:
        out = self.manifest_dir(arm, seed)
        if not (out / MANIFEST).is_file():
            plan = self.plan(arm.strategy, seed)
            producer = {"traditional": lambda: TraditionalProducer(),
                        "diffusion": lambda: ManifestProducer(self.pool(seed)),
                        "mixed": lambda: MixedProducer(TraditionalProducer(), ManifestProducer(self.pool(seed)))}
            new = producer[arm.producer]()(self.train, plan, seed)
            write_manifest(new, out)
        return out / MANIFEST

    # --- generators and samples ----------------------------------------------------------------------
    def generator_dir(self, seed: int, kind: str = "lcont") -> Path:
        """Run folder of the seed's generator: ``lcont`` (L_Gen) or ``plain`` (no L_Cont)."""
        return self.args.work / "generators" / f"{kind}-s{seed}"

    def diffusion_arms(self) -> list[str]:
        """The requested arms that train on generated images (groups d and e)."""
        return [n for n in self.args.arms if ARMS[n].group in "de"]

    def generator(self, seed: int, contrastive: bool = True) -> Path:
        """Train (or resume, or reuse) the class-conditional generator of this seed; cost in bench_cost.json."""
        from diffmed.diffusion.generative import GENERATOR_DIR, train_generator

        a = self.args
        run_dir = self.generator_dir(seed, "lcont" if contrastive else "plain")
        overrides = [*dataset_overrides(DATASET, a.data_dir), f"train.seed={seed}", "train.progress=false",
                     f"train.max_epochs={a.generator_epochs}", *self.limit_override()]
        if a.generator_batch_size:
            overrides.append(f"train.batch_size={a.generator_batch_size}")
        params = {"use_contrastive": contrastive, "size": a.generator_size, "max_epochs": a.generator_epochs,
                  "lr": a.generator_lr,
                  "sample_every_n_epochs": None if a.quick else 5}
        cfg = load_config(None, overrides=overrides)
        if not (run_dir / GENERATOR_DIR / "model.json").is_file() and not self.reuse_generator(seed, cfg, params,
                                                                                                run_dir):
            resume = (run_dir / CONFIG_FILE).is_file()
            _reset_peak()
            start = time.perf_counter()
            train_generator(cfg, run_dir, params, resume=resume)
            meta = json.loads((run_dir / GENERATOR_DIR / "model.json").read_text())
            all_segments = "train_seconds" in meta  # recorded by the generator's training clock
            seconds = meta["train_seconds"] if all_segments else time.perf_counter() - start
            atomic_write_json(run_dir / "bench_cost.json", {"train_seconds": seconds, "all_segments": all_segments,
                                                            "peak_memory_mb": peak_memory_mb(), "resumed": resume,
                                                            "epochs": a.generator_epochs})
        self.keep(run_dir, GENERATOR_RECORD, GENERATOR_DONE)
        return run_dir

    def reuse_generator(self, seed: int, cfg, params: dict, run_dir: Path) -> bool:
        """Copy ``--generators-from``/generator-s<seed> into ``run_dir`` if it was trained as this one would be."""
        from diffmed.diffusion.generative import GENERATOR_DIR, generator_param_changes

        source = self.args.generators_from and self.args.generators_from / f"generator-s{seed}"
        if not source or not record_complete(source, GENERATOR_DONE):
            return False
        meta = json.loads((source / GENERATOR_DIR / "model.json").read_text())
        theirs = load_config(source / CONFIG_FILE)
        changes = generator_param_changes(source, params)
        same = (not changes and meta["seed"] == seed
                and _same_data(theirs.data, cfg.data) and theirs.train.batch_size == cfg.train.batch_size)
        if not same:
            log.warning("%s was trained otherwise than this benchmark's %s (%s); training seed %d's", source,
                        run_dir.name, "; ".join(changes) or "seed, data or batch size", seed)
            return False
        shutil.copytree(source, run_dir, dirs_exist_ok=True)
        atomic_write_json(run_dir / "bench_cost.json", {"train_seconds": meta["train_seconds"], "all_segments": True,
                                                        "peak_memory_mb": None, "resumed": False,
                                                        "epochs": meta["epochs"], "reused_from": str(source)})
        return True

    def sample(self, gen_run: Path, name: str, counts: dict[str, int], sampler: str, steps: int, seed: int) -> Path:
        """Generated images for ``counts`` (reused when complete); speed in bench_cost.json."""
        from diffmed.diffusion.generate import generate

        out = self.args.work / "generated" / name
        if not (out / MANIFEST).is_file():
            _reset_peak()
            res = generate(gen_run, out, counts=counts, steps=steps, sampler=sampler, guidance=self.args.guidance,
                           seed=seed, batch_size=256)
            atomic_write_json(out / "bench_cost.json", {"seconds": res.seconds, "images": res.written,
                                                        "images_per_second": res.images_per_second,
                                                        "peak_memory_mb": peak_memory_mb(), "sampler": sampler,
                                                        "steps": steps, "resumed": res.kept > 0})
        return out / MANIFEST

    def pool(self, seed: int) -> Path:
        """One sample pool per seed: per class the most any requested diffusion strategy (or the table) needs."""
        strategies = sorted({ARMS[n].strategy for n in self.diffusion_arms()})
        need = np.zeros(len(self.train.class_names), int)
        for s in strategies:
            need = np.maximum(need, self.plan(s, seed).class_counts(self.train))
        if self.wants_generation_table(seed):
            need = np.maximum(need, self.args.eval_per_class)
        counts = {c: int(n) for c, n in zip(self.train.class_names, need) if n > 0}
        sampler, steps = self.args.pool_sampler, self.steps(self.args.pool_sampler)
        name = f"lcont-{sampler}{steps}-s{seed}-" + "-".join(f"{c}{n}" for c, n in counts.items())
        return self.sample(self.generator(seed), name, counts, sampler, steps, seed)

    def steps(self, sampler: str) -> int:
        return self.args.ddim_steps if sampler == "ddim" else self.args.ddpm_steps

    def lcont_samples(self, seed: int, sampler: str, counts: dict[str, int]) -> Path:
        """The L_Cont generator's images for the generation table: the training pool when it is this sampler's."""
        if sampler == self.args.pool_sampler:
            return self.pool(seed)
        steps = self.steps(sampler)
        return self.sample(self.generator(seed), f"lcont-{sampler}{steps}-s{seed}", counts, sampler, steps, seed)

    # --- generation quality --------------------------------------------------------------------------
    def wants_generation_table(self, seed: int) -> bool:
        a = self.args
        return not a.no_generation_table and (a.generation_seeds is None or seed in a.generation_seeds)

    def extractor(self, seed: int):
        from diffmed.evaluation.generation import domain_extractor

        return domain_extractor(self.train.images, self.train.targets, self.train.ids, self.args.feature_epochs, seed,
                                cache=self.args.work / "features" / f"domain-s{seed}.safetensors")

    def generation_table(self, seed: int) -> dict:
        """Per class quality of each image source against the real training images of that class."""
        from diffmed.evaluation.generation import class_features, evaluate_generated, images_by_class

        path = self.args.out / "generation" / f"s{seed}.json"
        if path.is_file():
            return json.loads(path.read_text())
        a, names = self.args, self.train.class_names
        n = a.eval_per_class
        counts = {c: n for c in names}
        sources = {f"diffusion L_Cont, {sampler.upper()} {self.steps(sampler)}"
                   + (" (training pool)" if sampler == a.pool_sampler else ""): self.lcont_samples(seed, sampler, counts)
                   for sampler in ("ddim", "ddpm")}
        if not a.no_lcont_ablation:
            sources[f"diffusion no L_Cont, DDIM {a.ddim_steps}"] = self.sample(
                self.generator(seed, contrastive=False), f"plain-ddim{a.ddim_steps}-s{seed}", counts, "ddim",
                a.ddim_steps, seed)
        real = images_by_class(self.train)
        fx, out = self.extractor(seed), {}
        real_f = class_features(real, fx)
        for label, manifest in sources.items():
            out[label] = evaluate_generated(real, read_manifest(manifest, self.train), fx, n, seed, real_f)
            out[label]["cost"] = _read_cost(manifest.parent)
        out["traditional (combined policy)"] = evaluate_generated(real, self.traditional_samples(n, seed), fx,
                                                                  seed=seed, real_features=real_f)
        out["generator_cost"] = {kind: _read_cost(self.generator_dir(seed, kind))
                                 for kind in ("lcont", "plain")}
        atomic_write_json(path, out)
        return out

    def traditional_samples(self, per_class: int, seed: int) -> LabelledSet:
        """``per_class`` traditionally augmented images of each class from randomly drawn real sources."""
        rng = np.random.default_rng(seed)
        rows = np.concatenate([rng.choice(np.flatnonzero(self.train.targets == k), per_class)
                               for k in range(len(self.train.class_names))])
        return TraditionalProducer()(self.train, plan_from_sources(rows), seed)


def sample_figure(bench: Bench, seed: int, per_row: int = 8) -> list[str]:
    """``samples_s{seed}.png`` beside the results: per class a row of real, traditionally augmented and
    diffusion (training pool) images; returns its markdown. A report of finished runs only (``--finished-only``)
    keeps a figure drawn before, rather than sampling the pool again for it."""
    path = bench.args.out / f"samples_s{seed}.png"
    rows_file = path.with_suffix(".json")
    if not (bench.args.finished_only and path.is_file() and rows_file.is_file()):
        labels = draw_samples(bench, seed, per_row, path)
        atomic_write_json(rows_file, labels)
    labels = json.loads(rows_file.read_text())
    return [f"## Images (seed {seed}; rows top to bottom: {', '.join(labels)})\n", f"![samples]({path.name})\n"]


def draw_samples(bench: Bench, seed: int, per_row: int, path: Path) -> list[str]:
    """Draw the figure of :func:`sample_figure` into ``path``; returns its rows' labels."""
    from PIL import Image

    sources = {"real": bench.train, "traditional": bench.traditional_samples(per_row, seed),
               "diffusion": read_manifest(bench.pool(seed), bench.train)}
    rows, labels = [], []
    for k, cls in enumerate(bench.train.class_names):
        for name, src in sources.items():
            idx = np.flatnonzero(src.targets == k)[:per_row]
            if len(idx) == per_row:
                rows.append(np.concatenate([np.pad(src.images[i, ..., 0], 1) for i in idx], axis=1))
                labels.append(f"{cls} {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows).astype(np.uint8)).save(path)
    return labels


def _same_data(a, b) -> bool:
    """The same data settings, the source compared by file name (machines keep the data in different folders)."""
    return (a.model_dump(exclude={"source"}) == b.model_dump(exclude={"source"})
            and Path(a.source).name == Path(b.source).name)


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _read_cost(folder: Path) -> dict:
    return read_json(folder / "bench_cost.json")


# ------------------------------------------------------------------------------------------- report
def compare(bench: Bench, arm_a: str, arm_b: str, seeds: list[int]) -> dict:
    from diffmed.evaluation.compare import compare_runs

    out = {}
    for s in seeds:
        res = compare_runs(bench.run_dir(arm_a, s), bench.run_dir(arm_b, s), metrics=METRICS, seed=s)
        res.pop("markdown", None)
        out[s] = res
    return out


def _synthetic_count(bench: Bench, arm: Arm, seed: int) -> int:
    return json.loads((bench.run_dir(arm.name, seed) / SYNTHETIC_COUNT).read_text())["images"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    bench = Bench(args)
    if args.prepare_generators:
        for seed in args.seeds:
            print("pool ready:", bench.pool(seed))
        return
    if args.generation_only:
        write_generation_results(bench)
        return
    results: dict = {"settings": settings_of(args),
                     "train_counts": dict(zip(bench.train.class_names, bench.train.class_counts().tolist())),
                     "arms": {}, "comparisons": {}, "generation": {}, "candidates": {}}
    runs: dict[str, dict[int, dict]] = {}  # arm -> seed -> metrics
    for seed in args.seeds:
        for name in args.arms:
            if args.finished_only and not (bench.run_dir(name, seed) / "metrics.json").is_file():
                continue
            runs.setdefault(name, {})[seed] = bench.run_arm(ARMS[name], seed)
        cand = args.work / "aug" / f"candidates-s{seed}.json"
        if cand.is_file():
            results["candidates"][seed] = {k: v for k, v in json.loads(cand.read_text()).items() if k != "rows"}
        if bench.wants_generation_table(seed) and bench.diffusion_arms():
            results["generation"][seed] = bench.generation_table(seed)

    rows = []
    for name, arm_runs in runs.items():
        arm = ARMS[name]
        s = summarize(list(arm_runs.values()), METRICS)
        s["n_synthetic"] = [_synthetic_count(bench, arm, seed) for seed in arm_runs]
        s["per_seed"] = {seed: {m: r["test"][m] for m in METRICS} for seed, r in arm_runs.items()}
        results["arms"][name] = s
        rows.append([name, GROUPS[arm.group], arm.strategy or "-", len(arm_runs), int(np.mean(s["n_synthetic"])),
                     *(f"{fmt(s[m])}<br>{per_seed_ci(s, m)}" for m in METRICS),
                     f"{s['cost'].get('train_seconds', float('nan')):.0f}"])

    pairs = [(n, "none") for n in runs if n != "none"]
    pairs += [(f"diff-{s}", f"trad-{s}") for s in STRATEGIES if f"diff-{s}" in runs and f"trad-{s}" in runs]
    pairs += [("dcube", n) for n in runs if "dcube" in runs and (ARMS[n].group in "bcd" or n == "dcube-worst")]
    pairs += [("dcube-weighted", n) for n in ("weighted", "dcube") if "dcube-weighted" in runs and n in runs]
    comp_rows = []
    for a, b in pairs:
        res = compare(bench, a, b, [seed for seed in runs[a] if seed in runs[b]])
        results["comparisons"][f"{a} vs {b}"] = res
        mc = ", ".join(f"{r['mcnemar']['p_value']:.3g}" for r in res.values())
        boot = lambda m: ", ".join(f"{r['metrics'][m]['diff']:+.3f} (p={r['metrics'][m]['p_value']:.3g})"
                                   for r in res.values())
        comp_rows.append([f"{a} vs {b}", mc, boot("balanced_acc"), boot("f1_macro"), boot("kappa"), boot("auc")])

    md = [f"# Synthetic rebalancing vs traditional augmentation ({DATASET}, ResNet-18 28 px)\n",
          f"Train counts {results['train_counts']}; seeds {args.seeds}; classifier epochs {args.epochs}; "
          f"generator epochs {args.generator_epochs} ({args.generator_size}); "
          f"{epoch_budget(bench)}.\n",
          "## Test metrics (mean ± sd over seeds; per-seed 95% bootstrap CIs)\n",
          markdown_table(["arm", "group", "strategy", "seeds", "synthetic images", "balanced acc", "macro-F1", "AUC",
                          "Cohen's kappa", "train s"], rows),
          "## Paired tests per seed (arm A minus arm B; McNemar p, paired bootstrap difference and p)\n",
          markdown_table(["A vs B", "McNemar p", "Δ balanced acc", "Δ macro-F1", "Δ kappa", "Δ AUC"], comp_rows)]
    if results["candidates"]:
        md += ["## Misclassified strategy: selected training images per seed\n",
               markdown_table(["seed", "misclassified", "selected (near boundary) per class"],
                              [[s, c["misclassified"], c["per_class"]] for s, c in results["candidates"].items()])]
    md += generation_markdown(results["generation"], bench.train.class_names)
    if bench.diffusion_arms():
        md += sample_figure(bench, args.seeds[0])
    if "dcube" in runs:
        md += dcube_selection(bench, list(runs["dcube"]))
    write_results(args.out, "results", results, "\n".join(md))
    gens = [g for s in args.seeds if ((g := bench.generator_dir(s)) / CONFIG_FILE).is_file()]
    save_configs([bench.run_dir(n, seed) for n in runs for seed in runs[n]] + gens, args.out)
    print("\n".join(md))


def write_generation_results(bench: Bench) -> None:
    """``generation.{json,md}``: the generation table of the requested seeds, without the classifier arms."""
    a = bench.args
    generation = {s: bench.generation_table(s) for s in a.seeds if bench.wants_generation_table(s)}
    md = [f"# Generated vs real images ({DATASET}): diffusion (with and without L_Cont) and traditional augmentation\n",
          f"Seeds {list(generation)}; {a.eval_per_class} images per class and source; generator epochs "
          f"{a.generator_epochs} ({a.generator_size}). Each seed's table is kept in generation/s<seed>.json.\n",
          *generation_markdown(generation, bench.train.class_names)]
    write_results(a.out, "generation", {"settings": settings_of(a), "generation": generation}, "\n".join(md))
    print("\n".join(md))


def dcube_selection(bench: Bench, seeds: list[int]) -> list[str]:
    """Arm f's Fig. 2 analogue (first seed) and the blocks its KS test selected per seed."""
    from diffmed.methods.dcube import read_selection

    runs = {s: bench.run_dir("dcube", s) for s in seeds}
    figure = runs[seeds[0]] / "stages" / "gaussianity" / "gaussianity.png"
    bench.args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, bench.args.out / "dcube_gaussianity.png")
    rows = []
    for s, run in runs.items():
        sel, _, _ = read_selection(run / "stages" / "dcube_selection.json")
        rows.append([s, sel.timestep, ", ".join(sel.best), ", ".join(sel.worst)])
    return ["## D-Cube (arm f): KS Gaussianity of the generator's blocks and the selected layers\n",
            f"Seed {seeds[0]}'s analysis on its training images (Fig. 2 analogue):\n",
            "![KS p-values](dcube_gaussianity.png)\n",
            markdown_table(["seed", "timestep", "selected (non-Gaussian)", "worst (most Gaussian)"], rows)]


def epoch_budget(bench: Bench) -> str:
    a = bench.args
    if a.limit_train_batches:
        return f"limit_train_batches {a.limit_train_batches}"
    if a.equal_steps:
        return f"equal steps: every arm trains {bench.real_batches()} batches per epoch, as many as arm a"
    return "every arm trains on all its images each epoch"


def _mean_cell(values: list, fmt: str) -> str:
    """Mean of the known values (a reused generator's peak memory is unknown), "-" when none is."""
    known = [v for v in values if v is not None]
    return fmt.format(np.mean(known)) if known else "-"


def generation_markdown(generation: dict, class_names: list[str]) -> list[str]:
    """Generation table (mean over seeds) and the cost table."""
    if not generation:
        return []
    seeds = list(generation)
    sources = [k for k in generation[seeds[0]] if k != "generator_cost"]
    spaces = sorted({generation[s][k]["feature_space"] for s in seeds for k in sources})
    keys = ("fid", "kid", "precision", "recall", "ssim", "psnr")
    rows, cost_rows = [], []
    for src in sources:
        for cls in [*class_names, "overall"]:
            vals = [generation[s][src]["per_class"].get(cls) if cls != "overall" else generation[s][src]["overall"]
                    for s in seeds]
            vals = [v for v in vals if v]
            if vals:
                rows.append([src, cls, *(f"{np.mean([v[k] for v in vals]):.4g}" for k in keys)])
        cost = [generation[s][src].get("cost", {}) for s in seeds]
        if cost and cost[0]:
            cost_rows.append([src, _mean_cell([c["images_per_second"] for c in cost], "{:.1f}"),
                              _mean_cell([c["peak_memory_mb"] for c in cost], "{:.0f}")])
    for kind, label in (("lcont", "generator training, L_Cont"), ("plain", "generator training, no L_Cont")):
        cost = [generation[s]["generator_cost"].get(kind, {}) for s in seeds]
        if cost and cost[0]:
            partial = any(c.get("resumed") and not c.get("all_segments") for c in cost)
            label += " (time since the last resume only)" if partial else ""
            label += " (reused from --generators-from: memory not measured here)" if all(
                c.get("reused_from") for c in cost) else ""
            cost_rows.append([label, _mean_cell([c["train_seconds"] for c in cost], "{:.0f} s"),
                              _mean_cell([c["peak_memory_mb"] for c in cost], "{:.0f}")])
    return ["## Generation quality per class (real training images as reference; mean over seeds)\n",
            f"Feature spaces: {', '.join(spaces)} (one domain extractor per seed, trained on the real training "
            "images; FID/KID/precision/recall are comparable within a seed's feature space only).\n",
            markdown_table(["source", "class", "FID", "KID", "precision", "recall", "SSIM (nearest real)",
                            "PSNR dB (nearest real)"], rows),
            "## Cost\n",
            "Peak memory: CUDA max allocated when on GPU, else the process's peak RSS (monotone over the run).\n",
            markdown_table(["what", "images/s or seconds", "peak memory MB"], cost_rows)]


if __name__ == "__main__":
    main()
