"""The in-memory form every data source is turned into, and the task contract a model carries."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

Task = Literal["binary", "multiclass", "multilabel", "ordinal"]
SPLITS = ("train", "val", "test")


@dataclass
class TaskSpec:
    """What a classifier predicts; saved with every trained model (its input contract's label half)."""

    task: Task
    class_names: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    three_way_columns: list[int] = field(default_factory=list)
    """Multi-label columns trained as (negative, positive, uncertain) under the U-MultiClass policy."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def num_outputs(self) -> int:
        """Logits the network must produce: C, plus one per three-way column."""
        return self.num_classes + len(self.three_way_columns)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "class_names": list(self.class_names), "channels": self.channels,
            "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
            "three_way_columns": list(self.three_way_columns),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(task=d["task"], class_names=list(d["class_names"]), channels=int(d["channels"]),
                   image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   three_way_columns=list(d.get("three_way_columns", [])))


@dataclass
class LabelledSet:
    """Images and labels of one dataset, all rows, before or after splitting.

    ``images`` is (N, H, W, C) uint8 or uint16 at the configured size; ``targets`` is (N,) int64 class
    indices for single-label tasks, or (N, C) float32 for multi-label with 1/0, -1 (uncertain) and NaN
    (not mentioned) until a label policy resolves them into values and ``mask``.
    """

    images: np.ndarray
    targets: np.ndarray
    task: Task
    class_names: list[str]
    ids: list[str]
    """Row identifiers for messages and predictions (file path relative to the root, or npz index)."""
    split: np.ndarray | None = None
    """Given split per row ('train'/'val'/'test') or None when diffmed must make one."""
    groups: np.ndarray | None = None
    mask: np.ndarray | None = None
    """(N, C) 1 where a multi-label target counts in the loss, 0 where a policy masked it out."""
    synthetic: np.ndarray | None = None
    """(N,) bool: images made by a generator (training split only)."""
    source: str = ""
    skipped: list[dict] = field(default_factory=list)
    """Unreadable files the loader skipped (``data.max_bad_files``): dicts with file, row, reason."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.targets) != n or len(self.ids) != n:
            raise ValueError("images, targets and ids must have one entry per row")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def max_value(self) -> int:
        return 65535 if self.images.dtype == np.uint16 else 255

    def subset(self, index: np.ndarray) -> "LabelledSet":
        """Rows ``index`` (int array or bool mask) as a new set sharing no arrays with this one."""
        index = np.asarray(index)
        pick = (lambda a: None if a is None else a[index])
        return replace(
            self, images=self.images[index], targets=self.targets[index],
            ids=[self.ids[i] for i in np.arange(len(self))[index]], split=pick(self.split),
            groups=pick(self.groups), mask=pick(self.mask), synthetic=pick(self.synthetic),
        )

    def class_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Images per class (single-label) or positives per label (multi-label), of ``rows`` (a mask) or all."""
        targets = self.targets if rows is None else self.targets[rows]
        if self.task == "multilabel":
            return np.nansum(targets == 1, axis=0).astype(int)
        return np.bincount(targets.astype(int), minlength=len(self.class_names))

    def real_and_synthetic_counts(self) -> dict[str, dict[str, int]]:
        """``class_counts`` of the real and of the synthetic images apart, by class name."""
        synthetic = np.zeros(len(self), bool) if self.synthetic is None else np.asarray(self.synthetic, bool)
        return {kind: dict(zip(self.class_names, map(int, self.class_counts(rows))))
                for kind, rows in (("real", ~synthetic), ("synthetic", synthetic))}

    def stratify_key(self) -> np.ndarray:
        """A per-row label used to stratify splits (first positive label for multi-label)."""
        if self.task == "multilabel":
            pos = np.nan_to_num(self.targets) == 1
            return np.where(pos.any(1), pos.argmax(1), -1)
        return self.targets.astype(int)


def concat_sets(sets: list[LabelledSet]) -> LabelledSet:
    """Stack sets with the same task and classes (e.g. real training split + synthetic images)."""
    first = sets[0]
    for s in sets[1:]:
        if s.class_names != first.class_names or s.task != first.task:
            raise ValueError(f"cannot mix {s.source} (classes {s.class_names}, task {s.task}) with {first.source} "
                             f"(classes {first.class_names}, task {first.task})")

    def cat(attr: str, default):
        parts = [getattr(s, attr) if getattr(s, attr) is not None else default(s) for s in sets]
        return np.concatenate(parts)

    return LabelledSet(
        images=np.concatenate([s.images for s in sets]), targets=cat("targets", None), task=first.task,
        class_names=first.class_names, ids=[i for s in sets for i in s.ids],
        split=cat("split", lambda s: np.full(len(s), "train", dtype=object)) if any(s.split is not None for s in sets) else None,
        groups=cat("groups", lambda s: np.array(s.ids, dtype=object)) if any(s.groups is not None for s in sets) else None,
        mask=cat("mask", lambda s: np.ones(s.targets.shape, np.float32)) if any(s.mask is not None for s in sets) else None,
        synthetic=cat("synthetic", lambda s: np.zeros(len(s), bool)),
        source="+".join(s.source for s in sets),
        skipped=[item for s in sets for item in s.skipped],
    )
