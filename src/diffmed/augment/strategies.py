"""Offline augmentation strategies (thesis section 4.5): build an augmented TRAINING set.

A *strategy* decides how many new images of which class, and from which source images, are made
(an :class:`AugmentPlan`); a *producer* makes them. Producers are interchangeable, so traditional and
diffusion augmentation follow exactly the same plans:

- ``traditional``: the thesis's combined transforms applied to the planned source image, each new image
  seeded from (seed, source id, copy number), so the output does not depend on plan order;
- ``diffusion``: images of the planned classes drawn from a generator's manifest (``diffmed generate``
  output, or :func:`diffmed.diffusion.generate.generate` called for the needed counts). A
  class-conditional generator draws *new* images of a class: for diffusion the source image of a plan
  row only fixes the class of the image that fills it;
- ``mixed``: each planned image comes from one of two producers with probability 0.5 (the thesis's
  "traditional method or the diffusion model for each augmentation time").

Strategies:

- ``unbalanced`` (thesis Table 4): every minority class (all classes below the largest count) gets
  ``k`` new images per image (thesis: 11); a random ``majority_fraction`` of the largest class
  (thesis: one third) gets one new image each. With the thesis's 1:9 imbalance this lands near balance.
- ``balanced``: every class is filled up to the largest class's count, cycling through its images in a
  seeded order so each is used as evenly as possible. (The thesis's Table 5 variant also undersampled
  the majority; the engine always trains on all real images, so we only add.)
- ``misclassified`` (thesis Fig. 20): training images the model gets wrong that lie closer than average
  to its decision boundary in the 2-D PCA plane of its penultimate features get ``k`` new images each.

New rows are marked ``synthetic=True`` with ids ``aug/<source id>/<k>`` (traditional) or
``gen/<generated id>`` (diffusion). Validation and test sets are never touched: strategies refuse a set
holding rows of another split.

:func:`augment_to_manifest` is the whole job behind ``diffmed augment`` (the training split ``diffmed train``
makes from a data config, a strategy, a producer, the manifest for ``data.synthetic``);
``benchmarks/rebalance.py`` shares its pieces (:func:`select_misclassified`, :func:`read_manifest`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from diffmed.augment.transforms import COMBINED, build_transform
from diffmed.data.types import LabelledSet, concat_sets
from diffmed.errors import ConfigError, DataError

STRATEGIES = ("unbalanced", "balanced", "misclassified")
PRODUCERS = ("traditional", "diffusion", "mixed")
THESIS_MINORITY_COPIES = 11
"""Unbalanced strategy: new images per minority image (thesis Table 4)."""
THESIS_MAJORITY_FRACTION = 1 / 3
"""Unbalanced strategy: share of the majority class augmented once (thesis Table 4)."""
MISCLASSIFIED_COPIES = THESIS_MINORITY_COPIES
"""New images per selected misclassified image; the thesis gives no number, we reuse the minority one."""
MANIFEST = "manifest.csv"


@dataclass
class AugmentPlan:
    """The new training images to make: one entry per image, as (source row, copy number)."""

    sources: np.ndarray
    """(M,) rows of the training set each new image is made from (for diffusion: whose class it takes)."""
    copies: np.ndarray
    """(M,) 0-based copy number of that source, so ``(source, copy)`` is unique."""

    def __len__(self) -> int:
        return len(self.sources)

    def class_counts(self, train: LabelledSet) -> np.ndarray:
        """New images per class."""
        return np.bincount(train.targets[self.sources].astype(int), minlength=len(train.class_names))

    def take(self, rows: np.ndarray) -> "AugmentPlan":
        return AugmentPlan(self.sources[rows], self.copies[rows])


def plan_from_sources(sources: np.ndarray) -> AugmentPlan:
    """A plan from source rows (repeats allowed), sorted, with copy numbers counting the repeats."""
    sources = np.sort(np.asarray(sources, dtype=np.int64), kind="stable")
    starts = np.searchsorted(sources, sources, side="left")
    return AugmentPlan(sources, np.arange(len(sources)) - starts)


def check_train_set(train: LabelledSet) -> None:
    """DataError unless ``train`` is a single-label, all-real training split (val/test never augmented)."""
    if train.split is not None:
        other = sorted({str(s) for s in train.split} - {"train"})
        if other:
            raise DataError(f"augmentation strategies take the training split only, but '{train.source}' has "
                            f"rows of split(s) {other}; pass sets['train'] (validation and test stay untouched)")
    if train.synthetic is not None and np.any(train.synthetic):
        raise DataError(f"'{train.source}' already holds synthetic rows; build augmentation from the real "
                        "training images (combine producers with producer='mixed' instead of chaining)")
    if train.task == "multilabel":
        raise ConfigError("offline augmentation strategies need single-label data (binary, multiclass or "
                          "ordinal); for multi-label data use an on-the-fly augment.policy")


# ------------------------------------------------------------------------------------------- strategies
def plan_unbalanced(train: LabelledSet, rng: np.random.Generator, k: int = THESIS_MINORITY_COPIES,
                    majority_fraction: float = THESIS_MAJORITY_FRACTION) -> AugmentPlan:
    """``k`` new images per minority image, one per image of a random ``majority_fraction`` of the largest class."""
    if k < 0 or not 0.0 <= majority_fraction <= 1.0:
        raise ConfigError(f"unbalanced strategy needs k >= 0 and 0 <= majority_fraction <= 1 "
                          f"(got k={k}, majority_fraction={majority_fraction})")
    counts = train.class_counts()
    sources = []
    for c, n in enumerate(counts):
        rows = np.flatnonzero(train.targets == c)
        if n == counts.max():
            take = int(round(majority_fraction * n))
            sources.append(np.sort(rng.choice(rows, take, replace=False)))
        else:
            sources.append(np.repeat(rows, k))
    return plan_from_sources(np.concatenate(sources))


def plan_balanced(train: LabelledSet, rng: np.random.Generator) -> AugmentPlan:
    """Fill every class to the largest class's count, using each source image as evenly as possible."""
    counts = train.class_counts()
    sources = []
    for c, n in enumerate(counts):
        need = int(counts.max() - n)
        if need == 0 or n == 0:
            continue
        rows = np.flatnonzero(train.targets == c)
        full, rest = divmod(need, int(n))
        sources += [np.repeat(rows, full), rng.choice(rows, rest, replace=False)]
    return plan_from_sources(np.concatenate(sources) if sources else np.empty(0, np.int64))


def plan_misclassified(train: LabelledSet, candidates: np.ndarray, k: int = MISCLASSIFIED_COPIES) -> AugmentPlan:
    """``k`` new images per candidate row (see :func:`misclassified_candidates`)."""
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    if len(candidates) and (candidates.min() < 0 or candidates.max() >= len(train)):
        raise ConfigError(f"misclassified candidates must be rows 0..{len(train) - 1} of the training set")
    if k < 0:
        raise ConfigError(f"misclassified strategy needs k >= 0 (got {k})")
    return plan_from_sources(np.repeat(candidates, k))


# ------------------------------------------------------------------------------ misclassified selection
def boundary_distances(features: np.ndarray, probs: np.ndarray, targets: np.ndarray,
                       n_components: int = 2) -> np.ndarray:
    """Distance of each image to the model's decision boundary in the PCA plane of its features.

    The features are projected onto their first ``n_components`` principal components (thesis: the
    first two, of DenseNet's penultimate layer). For a linear head the log-odds between classes i and j,
    ``log p_i - log p_j``, is a linear function of the features, so its least-squares fit on the PCA
    coordinates ``a.z + c`` is the head's decision function projected into the plane; ``a.z + c = 0`` is
    the "downscaled decision boundary" and ``|a.z + c| / ||a||`` the distance to it. Each image is
    measured to the boundary between its predicted class and its true class when it is misclassified,
    else its runner-up class (for two classes both are the one boundary).
    """
    from sklearn.decomposition import PCA

    features, targets = np.asarray(features, np.float64), np.asarray(targets).astype(int)
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None))
    if features.ndim != 2 or logp.shape[0] != len(features) or len(targets) != len(features):
        raise ValueError(f"features (N, D), probs (N, C) and targets (N,) must have one row per image; got "
                         f"{features.shape}, {logp.shape}, {targets.shape}")
    n_components = max(1, min(n_components, *features.shape))
    z = PCA(n_components, svd_solver="full").fit_transform(features)
    design = np.hstack([z, np.ones((len(z), 1))])
    order = np.argsort(-logp, axis=1)
    pred = order[:, 0]
    other = np.where(pred != targets, targets, order[:, 1])
    pairs = np.sort(np.stack([pred, other], 1), axis=1)
    dist = np.empty(len(z))
    for i, j in np.unique(pairs, axis=0):
        coef = np.linalg.lstsq(design, logp[:, i] - logp[:, j], rcond=None)[0]
        a, c = coef[:-1], coef[-1]
        rows = (pairs[:, 0] == i) & (pairs[:, 1] == j)
        norm = np.linalg.norm(a)
        dist[rows] = np.abs(z[rows] @ a + c) / norm if norm > 0 else np.inf
    return dist


def misclassified_candidates(features: np.ndarray, probs: np.ndarray, targets: np.ndarray,
                             n_components: int = 2) -> np.ndarray:
    """Rows the model misclassifies whose PCA-plane distance to the boundary is below the mean over all rows."""
    dist = boundary_distances(features, probs, targets, n_components)
    wrong = np.asarray(probs).argmax(1) != np.asarray(targets).astype(int)
    return np.flatnonzero(wrong & (dist < np.mean(dist[np.isfinite(dist)])))


def features_from_run(run_dir: str | Path, train: LabelledSet, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and float64 softmax probabilities of a trained run's model on ``train``.

    Uses the run's exported weights and its input contract (no augmentation, eval mode); the method must
    expose ``features(images)`` (the baseline does).
    """
    from diffmed.data.dataset import normalize, to_tensor
    from diffmed.data.types import TaskSpec
    from diffmed.engine.inference import device_of
    from diffmed.engine.run import load_trained

    method, meta, _ = load_trained(Path(run_dir))
    if list(meta.get("class_names", train.class_names)) != list(train.class_names):
        raise ConfigError(f"run '{run_dir}' was trained on classes {meta['class_names']} but the training set has "
                          f"{list(train.class_names)}; use a classifier trained on this dataset")
    if not hasattr(method, "features"):
        raise ConfigError(f"method '{meta['method']}' of run '{run_dir}' has no features(); misclassified "
                          "augmentation needs a classifier with penultimate features (e.g. baseline)")
    spec, device = TaskSpec.from_dict(meta), device_of(method)
    feats, logits = [], []
    with torch.inference_mode():
        for start in range(0, len(train), batch_size):
            x = normalize(to_tensor(train.images[start:start + batch_size], train.max_value), spec).to(device)
            feats.append(method.features(x).float().cpu())
            logits.append(method.predict_logits(x).float().cpu()[:, : spec.num_classes])
    logits = torch.cat(logits).double()
    return torch.cat(feats).numpy(), torch.softmax(logits, 1).numpy()


@dataclass
class MisclassifiedSelection:
    """The misclassified strategy's source images, picked with a trained classifier."""

    rows: np.ndarray
    """Training rows misclassified and nearer than average to the decision boundary (the candidates)."""
    misclassified: int
    """Training images the classifier gets wrong (selected or not)."""
    per_class: list[int]
    """Selected rows per class (true class)."""

    def to_json(self) -> dict:
        return {"rows": self.rows.tolist(), "misclassified": self.misclassified, "per_class": self.per_class}


def select_misclassified(run_dir: str | Path, train: LabelledSet, n_components: int = 2) -> MisclassifiedSelection:
    """Candidates of the misclassified strategy from a trained classifier run (see :func:`features_from_run`)."""
    feats, probs = features_from_run(run_dir, train)
    targets = np.asarray(train.targets).astype(int)
    rows = misclassified_candidates(feats, probs, targets, n_components)
    return MisclassifiedSelection(rows, int(np.sum(probs.argmax(1) != targets)),
                                  np.bincount(targets[rows], minlength=len(train.class_names)).tolist())


# ------------------------------------------------------------------------------------------ producers
class Producer(Protocol):
    """Makes the planned images: returns only the new rows (synthetic, split 'train'), in plan order."""

    def __call__(self, train: LabelledSet, plan: AugmentPlan, seed: int) -> LabelledSet: ...


def _stable_seed(*parts: Any) -> int:
    """A 63-bit seed from its parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _new_rows(train: LabelledSet, rows: np.ndarray, images: np.ndarray, ids: list[str]) -> LabelledSet:
    """Rows ``rows`` of ``train`` with new images and ids, marked synthetic training rows."""
    out = train.subset(rows)
    out.images, out.ids = images, ids
    out.synthetic = np.ones(len(out), bool)
    out.split = np.full(len(out), "train", dtype=object)
    out.groups = np.array(ids, dtype=object) if train.groups is not None else None
    return out


class TraditionalProducer:
    """Traditional transforms (default: the thesis's combined policy, each method with probability ``p``)."""

    def __init__(self, methods: Sequence[str] = COMBINED, p: float = 0.5) -> None:
        self.methods, self.p = list(methods), p
        self.transform = build_transform("traditional", self.methods, p)

    def __call__(self, train: LabelledSet, plan: AugmentPlan, seed: int) -> LabelledSet:
        from diffmed.data.dataset import to_tensor

        peak = train.max_value
        out = np.empty((len(plan), *train.images.shape[1:]), train.images.dtype)
        with torch.random.fork_rng(devices=[]):  # torchvision v2 draws from the global generator
            for j, (src, k) in enumerate(zip(plan.sources, plan.copies)):
                torch.random.default_generator.manual_seed(_stable_seed(seed, train.ids[src], k))
                y = self.transform(to_tensor(train.images[src:src + 1], peak)[0])
                out[j] = (y.clamp(0, 1) * peak).round().permute(1, 2, 0).numpy().astype(out.dtype)
        ids = [f"aug/{train.ids[s]}/{k}" for s, k in zip(plan.sources, plan.copies)]
        return _new_rows(train, plan.sources, out, ids)


def read_manifest(manifest: str | Path, like: LabelledSet) -> LabelledSet:
    """Images of a generated manifest (``diffmed generate`` or :func:`write_manifest` layout), read at the
    size, channels, class order and task of ``like`` (usually the real training set); classes may be empty."""
    from diffmed.config import DataConfig
    from diffmed.data import load_source

    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"generated manifest '{manifest}' not found; run `diffmed generate` first")
    if like.task == "multilabel":
        raise ConfigError(f"generated manifest '{manifest}' holds one class per image; the multi-label set "
                          f"'{like.source}' cannot take it")
    cfg = DataConfig(source=str(manifest), label_columns=["label"], class_names=list(like.class_names), task=like.task,
                     image_size=int(like.images.shape[1]), channels=like.channels)
    return load_source(cfg, allow_empty_classes=True)  # often only the rare classes


class ManifestProducer:
    """Images of the planned classes drawn (seeded, without replacement) from a generated manifest."""

    def __init__(self, manifest: str | Path) -> None:
        self.manifest = Path(manifest)
        self._pool: LabelledSet | None = None

    def pool(self, train: LabelledSet) -> LabelledSet:
        """The generated images, read once, at the training set's size, channels and class order."""
        if self._pool is None:
            self._pool = read_manifest(self.manifest, train)
        return self._pool

    def __call__(self, train: LabelledSet, plan: AugmentPlan, seed: int) -> LabelledSet:
        pool, rng = self.pool(train), np.random.default_rng(_stable_seed(seed, "manifest"))
        wanted = train.targets[plan.sources].astype(int)
        picks = np.empty(len(plan), np.int64)
        for c in np.unique(wanted):
            have = np.flatnonzero(pool.targets == c)
            slots = np.flatnonzero(wanted == c)
            if len(have) < len(slots):
                raise DataError(f"'{self.manifest}' has {len(have)} generated images of class "
                                f"'{train.class_names[c]}' but the strategy needs {len(slots)}; generate more "
                                "(diffmed generate --counts / --balance-to)")
            picks[slots] = np.sort(rng.choice(have, len(slots), replace=False))
        images = _convert_depth(pool.images[picks], train.images.dtype)
        return _new_rows(train, plan.sources, images, [f"gen/{pool.ids[i]}" for i in picks])


def _convert_depth(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """uint8 <-> uint16 so generated PNGs match the training set's bit depth."""
    if images.dtype == dtype:
        return images
    if images.dtype == np.uint8 and dtype == np.uint16:
        return images.astype(np.uint16) * 257
    return (images.astype(np.float64) / 257).round().astype(dtype)


class GeneratorProducer(ManifestProducer):
    """Calls ``generate()`` of a trained generator run for exactly the planned counts, then draws from it."""

    def __init__(self, generator_run: str | Path, out_dir: str | Path, **generate_options: Any) -> None:
        super().__init__(Path(out_dir) / MANIFEST)
        self.generator_run, self.out_dir, self.options = Path(generator_run), Path(out_dir), generate_options

    def __call__(self, train: LabelledSet, plan: AugmentPlan, seed: int) -> LabelledSet:
        if not self.manifest.is_file():
            from diffmed.diffusion.generate import generate

            counts = {name: int(n) for name, n in zip(train.class_names, plan.class_counts(train)) if n > 0}
            generate(self.generator_run, self.out_dir, counts=counts, seed=seed, **self.options)
        return super().__call__(train, plan, seed)


class MixedProducer:
    """Each planned image from producer ``a`` with probability ``share_a``, else from ``b`` (seeded)."""

    def __init__(self, a: Producer, b: Producer, share_a: float = 0.5) -> None:
        self.a, self.b, self.share_a = a, b, share_a

    def __call__(self, train: LabelledSet, plan: AugmentPlan, seed: int) -> LabelledSet:
        use_a = np.random.default_rng(_stable_seed(seed, "mixed")).random(len(plan)) < self.share_a
        parts = [p(train, plan.take(rows), seed) for p, rows in ((self.a, use_a), (self.b, ~use_a)) if rows.any()]
        if not parts:
            return train.subset(np.empty(0, np.int64))
        return concat_sets(parts) if len(parts) > 1 else parts[0]


def make_producer(name: str, *, methods: Sequence[str] = COMBINED, p: float = 0.5,
                  manifest: str | Path | None = None, generator_run: str | Path | None = None,
                  generate_dir: str | Path | None = None, generate_options: dict | None = None,
                  share_traditional: float = 0.5) -> Producer:
    """A producer by name: traditional | diffusion (from ``manifest`` or ``generator_run``) | mixed."""
    if name not in PRODUCERS:
        raise ConfigError(f"unknown augmentation producer '{name}'; choose one of {', '.join(PRODUCERS)}")
    if name == "traditional":
        return TraditionalProducer(methods, p)
    if manifest is not None:
        diffusion: Producer = ManifestProducer(manifest)
    elif generator_run is not None and generate_dir is not None:
        diffusion = GeneratorProducer(generator_run, generate_dir, **(generate_options or {}))
    else:
        raise ConfigError(f"producer '{name}' needs a generated manifest (manifest=...) or a generator run "
                          "and an output folder (generator_run=..., generate_dir=...)")
    if name == "diffusion":
        return diffusion
    return MixedProducer(TraditionalProducer(methods, p), diffusion, share_traditional)


# ------------------------------------------------------------------------------------------ entry point
def plan_strategy(train: LabelledSet, strategy: str, seed: int = 0, k: int | None = None,
                  majority_fraction: float = THESIS_MAJORITY_FRACTION,
                  candidates: np.ndarray | None = None) -> AugmentPlan:
    """The plan of a named strategy (``k`` defaults to the strategy's thesis value)."""
    check_train_set(train)
    rng = np.random.default_rng(_stable_seed(seed, strategy))
    if strategy == "unbalanced":
        return plan_unbalanced(train, rng, THESIS_MINORITY_COPIES if k is None else k, majority_fraction)
    if strategy == "balanced":
        return plan_balanced(train, rng)
    if strategy == "misclassified":
        if candidates is None:
            raise ConfigError("strategy 'misclassified' needs candidates=misclassified_candidates(features, "
                              "probs, targets) from a model trained on this training set")
        return plan_misclassified(train, candidates, MISCLASSIFIED_COPIES if k is None else k)
    raise ConfigError(f"unknown augmentation strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")


def build_augmented_train(train: LabelledSet, strategy: str, producer: str | Producer = "traditional", *,
                          seed: int = 0, k: int | None = None,
                          majority_fraction: float = THESIS_MAJORITY_FRACTION,
                          candidates: np.ndarray | None = None, **producer_options: Any) -> LabelledSet:
    """The real training set plus the images a strategy plans and a producer makes (new rows synthetic).

    ``producer`` is a :data:`PRODUCERS` name (options as in :func:`make_producer`) or a producer object.
    """
    plan = plan_strategy(train, strategy, seed, k, majority_fraction, candidates)
    make = make_producer(producer, **producer_options) if isinstance(producer, str) else producer
    new = make(train, plan, seed) if len(plan) else None
    real = train.subset(np.arange(len(train)))
    real.synthetic = np.zeros(len(real), bool)
    return concat_sets([real, new]) if new is not None else real


# ------------------------------------------------------------------------------------- manifest output
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "x"


def write_manifest(ds: LabelledSet, out_dir: str | Path, only_synthetic: bool = True) -> Path:
    """Save rows as ``out_dir/images/<class>/<id>.png`` plus ``out_dir/manifest.csv``.

    Columns ``path`` (relative to ``images/``), ``label`` (class name), ``synthetic`` (1/0), ``id``: the
    layout of ``diffmed generate`` (same class folder names), so the engine mixes them in with
    ``data.synthetic=[manifest.csv]``. The CSV is written last (atomically): its presence marks a
    complete folder.
    """
    import pandas as pd
    from PIL import Image

    from diffmed.diffusion.generate import class_folders
    from diffmed.engine.checkpoint import atomic_write_bytes

    out_dir = Path(out_dir)
    rows = np.flatnonzero(ds.synthetic) if only_synthetic and ds.synthetic is not None else np.arange(len(ds))
    if ds.task == "multilabel":
        raise ConfigError("write_manifest writes single-label manifests only")
    records, seen, folders = [], set(), class_folders(ds.class_names)
    for i in rows:
        cls = ds.class_names[int(ds.targets[i])]
        rel = f"{folders[int(ds.targets[i])]}/{_safe_name(ds.ids[i])}.png"
        if rel in seen:
            raise DataError(f"ids '{ds.ids[i]}' and another row map to the same file name '{rel}'")
        seen.add(rel)
        path = out_dir / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = ds.images[i]
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        records.append({"path": rel, "label": cls, "synthetic": int(ds.synthetic is not None and bool(ds.synthetic[i])),
                        "id": ds.ids[i]})
    csv = out_dir / MANIFEST
    table = pd.DataFrame(records, columns=["path", "label", "synthetic", "id"])
    atomic_write_bytes(csv, table.to_csv(index=False).encode())
    return csv



# --------------------------------------------------------------------------- whole job (diffmed augment)
AUGMENT_FILE = "augment.json"
GENERATED_DIR = "generated"


@dataclass
class AugmentResult:
    manifest: Path
    real_counts: dict[str, int]
    """Real training images per class."""
    added: dict[str, int]
    """New (synthetic) training images per class, as written to the manifest."""
    selection: MisclassifiedSelection | None = None


def _choice(value: str, choices: Sequence[str], option: str) -> None:
    import difflib

    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{option} '{value}' is not one of {', '.join(choices)}.{hint}")


def check_augment_options(strategy: str, producer: str, methods: Sequence[str] | None = None, k: int | None = None,
                          generator_run: str | Path | None = None, model_run: str | Path | None = None) -> None:
    """ConfigError, naming the ``diffmed augment`` option and what to do, for options that do not fit together."""
    from diffmed.augment.transforms import TRADITIONAL

    _choice(strategy, STRATEGIES, "--strategy")
    _choice(producer, PRODUCERS, "--producer")
    if strategy == "misclassified" and model_run is None:
        raise ConfigError("--strategy misclassified needs --model RUN: a classifier run trained on this data (e.g. "
                          "`diffmed train --data D --method baseline --out RUN`) whose mistakes pick the images")
    if strategy != "misclassified" and model_run is not None:
        raise ConfigError(f"--model is used by --strategy misclassified only (got --strategy {strategy}); drop it")
    if producer in ("diffusion", "mixed") and generator_run is None:
        raise ConfigError(f"--producer {producer} needs --generator RUN: a generator run folder from "
                          "`diffmed generator train --data D --out RUN`")
    if producer == "traditional" and generator_run is not None:
        raise ConfigError("--generator is used by --producer diffusion or mixed only; drop it or choose one of those")
    if methods is not None:
        if producer == "diffusion":
            raise ConfigError("--methods sets the traditional transforms: it applies to --producer traditional or "
                              "mixed only")
        unknown = [m for m in methods if m not in TRADITIONAL]
        if unknown or not methods:
            raise ConfigError(f"--methods {list(methods)}: give a comma-separated list of {', '.join(TRADITIONAL)}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if k is not None:
        if strategy == "balanced":
            raise ConfigError("--k (new images per source image) applies to --strategy unbalanced or misclassified; "
                              "balanced fills every class up to the largest")
        if k < 0:
            raise ConfigError(f"--k {k} must be >= 0")


def augment_to_manifest(cfg, out_dir: str | Path, strategy: str, producer: str = "traditional", *,
                        methods: Sequence[str] | None = None, k: int | None = None, seed: int = 0,
                        generator_run: str | Path | None = None, model_run: str | Path | None = None,
                        generate_options: dict | None = None) -> AugmentResult:
    """``diffmed augment``: the new images of a strategy for the training split of ``cfg.data``, as a manifest.

    The training split is the one ``diffmed train`` makes from the same data config (``splits.json`` is
    written to ``out_dir``); ``misclassified`` picks its images with the classifier of ``model_run``;
    ``diffusion``/``mixed`` sample exactly the planned counts from ``generator_run`` into
    ``out_dir/generated/`` (resumable). Writes ``out_dir/images/``, ``out_dir/manifest.csv`` (the rows
    for ``data.synthetic``) and ``out_dir/augment.json`` (settings and counts).
    """
    from diffmed.engine.checkpoint import atomic_write_json
    from diffmed.engine.data import real_training_set
    from diffmed.errors import RunError

    check_augment_options(strategy, producer, methods, k, generator_run, model_run)
    if cfg.data.synthetic:
        raise ConfigError(f"data.synthetic is set ({cfg.data.synthetic}): augmentation starts from the real training "
                          "images; drop it here and add both manifests to data.synthetic when training")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).is_file():
        raise RunError(f"'{out_dir}' already holds an augmented training set ({MANIFEST}); choose another --out "
                       "or delete the folder")
    if generator_run is not None:
        from diffmed.diffusion.generative import read_generator_meta

        gen_classes = list(read_generator_meta(Path(generator_run))["spec"]["class_names"])
    train = real_training_set(cfg, out_dir)
    if generator_run is not None and gen_classes != list(train.class_names):
        raise ConfigError(f"--generator '{generator_run}' makes classes {gen_classes} but the training set has "
                          f"{list(train.class_names)}; use a generator trained on this dataset")
    selection = select_misclassified(model_run, train) if model_run is not None else None
    options: dict[str, Any] = {"methods": tuple(methods) if methods else COMBINED}
    if generator_run is not None:
        options.update(generator_run=Path(generator_run), generate_dir=out_dir / GENERATED_DIR,
                       generate_options=dict(generate_options or {}))
    augmented = build_augmented_train(train, strategy, producer, seed=seed, k=k,
                                      candidates=None if selection is None else selection.rows, **options)
    new = augmented.subset(augmented.synthetic)
    csv = write_manifest(new, out_dir)
    result = AugmentResult(csv, dict(zip(train.class_names, train.class_counts().tolist())),
                           dict(zip(train.class_names, new.class_counts().tolist())), selection)
    atomic_write_json(out_dir / AUGMENT_FILE, {
        "strategy": strategy, "producer": producer, "methods": list(options["methods"]), "k": k, "seed": seed,
        "generator_run": None if generator_run is None else str(generator_run),
        "generate_options": None if generator_run is None else generate_options or {},
        "model_run": None if model_run is None else str(model_run),
        "data": cfg.data.model_dump(mode="json"), "real_counts": result.real_counts, "added": result.added,
        "misclassified": None if selection is None else selection.to_json()})
    return result


__all__ = [
    "AUGMENT_FILE", "AugmentPlan", "AugmentResult", "GeneratorProducer", "MANIFEST", "ManifestProducer",
    "MisclassifiedSelection", "MixedProducer", "PRODUCERS", "Producer", "STRATEGIES", "THESIS_MAJORITY_FRACTION",
    "THESIS_MINORITY_COPIES", "TraditionalProducer", "augment_to_manifest", "boundary_distances",
    "build_augmented_train", "check_augment_options", "check_train_set", "features_from_run", "make_producer",
    "misclassified_candidates", "plan_balanced", "plan_from_sources", "plan_misclassified", "plan_strategy",
    "plan_unbalanced", "read_manifest", "select_misclassified", "write_manifest",
]
