"""Uncertain (-1) and missing (blank) multi-label entries, resolved by the CheXpert policies.

Raw multi-label targets hold 1, 0, -1 (uncertain) and NaN (not mentioned). A policy turns them into
trainable values plus a ``mask`` (1 = the entry counts in the loss):

* ``ignore`` (U-Ignore): uncertain entries are masked out.
* ``zeros`` / ``ones`` (U-Zeros / U-Ones): uncertain counts as negative / positive.
* ``multiclass`` (U-MultiClass): the entry keeps the value 2 and the whole column is trained as a
  3-way softmax over (negative, positive, uncertain); those columns are returned so the TaskSpec can
  list them in ``three_way_columns``.
* ``selftrained`` (U-SelfTrained): stage one is U-Ignore; after a first model is trained,
  :func:`relabel_uncertain` fills the uncertain entries with its probabilities and unmasks them.

Missing entries: ``fill0`` / ``fill1`` (FillNM with 0 or 1) or ``ignore`` (masked out).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from diffmed.data.types import LabelledSet
from diffmed.errors import ConfigError

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones", "multiclass", "selftrained")
MISSING_POLICIES = ("ignore", "fill0", "fill1")
UNCERTAIN_VALUE = 2.0
"""Target value of an uncertain entry in a U-MultiClass column (class index 2 of its softmax)."""


def column_policies(class_names: list[str], uncertain_policy: str | dict[str, str]) -> list[str]:
    """The uncertain policy of every label column; columns a mapping does not name use ``ignore``."""
    def check(policy: str, where: str) -> str:
        if policy not in UNCERTAIN_POLICIES:
            raise ConfigError(f"{where}: unknown uncertain-label policy '{policy}'; "
                              f"choose one of {', '.join(UNCERTAIN_POLICIES)}")
        return policy

    if isinstance(uncertain_policy, str):
        return [check(uncertain_policy, "data.uncertain_policy")] * len(class_names)
    unknown = [k for k in uncertain_policy if k not in class_names]
    if unknown:
        raise ConfigError(f"data.uncertain_policy names column(s) {unknown} that are not label columns; "
                          f"valid columns: {', '.join(class_names)}")
    return [check(uncertain_policy.get(c, "ignore"), f"data.uncertain_policy.{c}") for c in class_names]


def apply_label_policies(ds: LabelledSet, uncertain_policy: str | dict[str, str],
                         missing_policy: str) -> tuple[LabelledSet, list[int]]:
    """Resolve -1/NaN multi-label entries; returns the new set and its U-MultiClass column indices.

    Single-label sets are returned unchanged with no three-way columns.
    """
    if missing_policy not in MISSING_POLICIES:
        raise ConfigError(f"data.missing_policy: unknown policy '{missing_policy}'; "
                          f"choose one of {', '.join(MISSING_POLICIES)}")
    if ds.task != "multilabel":
        return ds, []
    policies = column_policies(ds.class_names, uncertain_policy)
    raw = np.asarray(ds.targets, dtype=np.float32)
    bad = ~(np.isnan(raw) | np.isin(raw, (0.0, 1.0, -1.0)))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{ds.ids[r]}: target {raw[r, c]} in column '{ds.class_names[c]}' is not 1/0/-1/blank "
                         "(were label policies applied twice?)")
    targets = raw.copy()
    mask = np.ones(raw.shape, np.float32) if ds.mask is None else ds.mask.astype(np.float32).copy()

    missing = np.isnan(raw)
    targets[missing] = 1.0 if missing_policy == "fill1" else 0.0
    if missing_policy == "ignore":
        mask[missing] = 0.0

    three_way = []
    for c, policy in enumerate(policies):
        unc = raw[:, c] == -1
        if policy in ("ignore", "selftrained"):
            targets[unc, c], mask[unc, c] = 0.0, 0.0
        elif policy == "zeros":
            targets[unc, c] = 0.0
        elif policy == "ones":
            targets[unc, c] = 1.0
        else:  # multiclass
            targets[unc, c] = UNCERTAIN_VALUE
            three_way.append(c)
    return replace(ds, targets=targets, mask=mask), three_way


def relabel_uncertain(ds: LabelledSet, original_targets: np.ndarray, probs: np.ndarray,
                      columns: list[int] | list[str]) -> LabelledSet:
    """U-SelfTrained stage two: uncertain entries of ``columns`` get the model's probabilities.

    ``original_targets`` are the raw targets (with -1) of the same rows, ``probs`` (N, C) the first
    model's sigmoid outputs; the filled entries are unmasked so they count in the loss as soft labels.
    """
    idx = [ds.class_names.index(c) if isinstance(c, str) else int(c) for c in columns]
    original_targets, probs = np.asarray(original_targets), np.asarray(probs, dtype=np.float32)
    if original_targets.shape != ds.targets.shape or probs.shape != ds.targets.shape:
        raise ValueError(f"original_targets {original_targets.shape} and probs {probs.shape} must match "
                         f"the set's targets {ds.targets.shape}")
    targets = ds.targets.astype(np.float32).copy()
    mask = np.ones(targets.shape, np.float32) if ds.mask is None else ds.mask.astype(np.float32).copy()
    for c in idx:
        unc = original_targets[:, c] == -1
        targets[unc, c] = np.clip(probs[unc, c], 0.0, 1.0)
        mask[unc, c] = 1.0
    return replace(ds, targets=targets, mask=mask)


def selftrained_columns(ds: LabelledSet, uncertain_policy: str | dict[str, str]) -> list[int]:
    """Columns to relabel after the first U-SelfTrained stage (empty for single-label sets)."""
    if ds.task != "multilabel":
        return []
    return [c for c, p in enumerate(column_policies(ds.class_names, uncertain_policy)) if p == "selftrained"]
