"""From a DataConfig to split sets, the task contract and a DataModule (the engine's data stage)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmed.augment.transforms import build_transform
from diffmed.config import RunConfig
from diffmed.data import apply_label_policies, load_source, resolve_splits
from diffmed.data.labels import selftrained_columns
from diffmed.data.dataset import DataModule
from diffmed.data.splits import subsample_train
from diffmed.data.types import LabelledSet, TaskSpec, concat_sets

SPLITS_FILE = "splits.json"


@dataclass
class PreparedData:
    sets: dict[str, LabelledSet]
    spec: TaskSpec
    uncertain_columns: list[int]
    """Multi-label columns under U-SelfTrained (relabelled after a first training stage)."""
    raw_train_targets: np.ndarray | None = None
    """Training targets before the label policy (to find the uncertain entries to relabel)."""


def _manifest_columns(manifest: str, cfg: RunConfig) -> dict:
    """Path/label columns to read a synthetic manifest with: the dataset's own when the manifest has them,
    else ``path``/``label``, the layout ``diffmed generate`` and ``diffmed augment`` write (so a CSV dataset
    labelled by e.g. ``dx`` still takes their manifests)."""
    import pandas as pd

    own = {"path_column": cfg.data.path_column, "label_columns": list(cfg.data.label_columns)}
    if not Path(manifest).is_file() or Path(manifest).suffix.lower() != ".csv":
        return own  # load_source reports a missing file or reads a folder as usual
    columns = set(pd.read_csv(manifest, nrows=0).columns)
    if {own["path_column"], *own["label_columns"]} <= columns or not {"path", "label"} <= columns:
        return own
    return {"path_column": "path", "label_columns": ["label"]}


def _synthetic_sets(cfg: RunConfig, real: LabelledSet) -> list[LabelledSet]:
    """Generated images from manifests, for the training split only, with the real set's class order and task
    (a manifest's labels alone read as multiclass, so an ordinal set's would not mix)."""
    out = []
    for manifest in cfg.data.synthetic:
        syn_cfg = cfg.data.model_copy(update={"source": manifest, "csv": None, "image_root": None,
                                              "class_names": real.class_names, "task": real.task, "group_column": None,
                                              "split_column": None, "synthetic": [],
                                              **_manifest_columns(manifest, cfg)})
        syn = load_source(syn_cfg, allow_empty_classes=True)  # a manifest may hold only rare classes
        syn.synthetic = np.ones(len(syn), bool)
        out.append(syn)
    return out


def _mix_synthetic(train: LabelledSet, synthetic: list[LabelledSet], ratio: float | None, seed: int) -> LabelledSet:
    if not synthetic:
        return train
    syn = concat_sets(synthetic)
    if ratio is not None:
        keep = min(len(syn), int(round(ratio * len(train))))
        syn = syn.subset(np.sort(np.random.default_rng(seed).permutation(len(syn))[:keep]))
    return concat_sets([train, syn])


def prepare_data(cfg: RunConfig, run_dir: Path) -> PreparedData:
    """Load, resolve label policies, split (reusing ``splits.json``), subsample and mix synthetic images."""
    ds = load_source(cfg.data)
    raw_targets = ds.targets  # label policies return a new set; these stay the file's values
    ds, three_way = apply_label_policies(ds, cfg.data.uncertain_policy, cfg.data.missing_policy)
    splits = {name: np.asarray(idx, dtype=int) for name, idx in resolve_splits(ds, cfg.data, run_dir / SPLITS_FILE).items()}
    unlabelled = None
    if cfg.data.train_fraction < 1.0:
        unlabelled = ds.subset(splits["train"])
        keep = subsample_train(np.arange(len(splits["train"])), unlabelled, cfg.data.train_fraction,
                               cfg.data.split_seed)
        splits["train"] = splits["train"][np.asarray(keep, dtype=int)]
    sets = {name: ds.subset(idx) for name, idx in splits.items()}
    # the whole real training split (labels unused), for self-supervised pre-training stages
    sets["unlabelled"] = unlabelled if unlabelled is not None else sets["train"]
    sets["train"] = _mix_synthetic(sets["train"], _synthetic_sets(cfg, ds), cfg.data.synthetic_ratio, cfg.train.seed)
    channels = cfg.data.channels or ds.channels
    spec = TaskSpec(task=ds.task, class_names=list(ds.class_names), channels=channels,
                    image_size=cfg.data.image_size, mean=(0.5,) * channels, std=(0.5,) * channels,
                    three_way_columns=list(three_way))
    selftrained = selftrained_columns(ds, cfg.data.uncertain_policy)
    raw_train = raw_targets[splits["train"]] if selftrained else None
    return PreparedData(sets, spec, selftrained, raw_train)


def real_training_set(cfg: RunConfig, run_dir: Path) -> LabelledSet:
    """The real images of the training split exactly as ``prepare_data`` makes it (``splits.json`` in
    ``run_dir`` reused or written, ``data.train_fraction`` applied), without any ``data.synthetic`` images:
    what generators are trained on, evaluated against and offline augmentation starts from."""
    real_only = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": []})})
    return prepare_data(real_only, Path(run_dir)).sets["train"]


def make_datamodule(cfg: RunConfig, data: PreparedData, balanced_sampler: bool = False) -> DataModule:
    transform = build_transform(cfg.augment.policy, cfg.augment.methods, cfg.augment.p)
    return DataModule(data.sets, data.spec, cfg.train.batch_size, cfg.train.seed, transform,
                      cfg.data.num_workers, balanced_sampler)
