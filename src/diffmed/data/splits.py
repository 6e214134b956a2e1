"""Seeded, stratified, group-aware train/val/test splits, saved as splits.json and reused.

A split is made once per run directory and written with the row ids it holds, so a re-run (or a
later evaluation) uses exactly the same images even if the manifest's row order changes. Splits
given by the data (MedMNIST's official split, a CSV split column) are kept; only missing ones are
carved out of the training rows. Fractions are of all (real) rows.

Carving is done per stratum (class, or first positive label for multi-label) over whole groups
(patients/lesions), so no group is ever in two splits; with no groups the sizes are exact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from diffmed.config import DataConfig, RunConfig
from diffmed.data.types import SPLITS, LabelledSet
from diffmed.errors import ConfigError, DataError

log = logging.getLogger("diffmed.data")
FORMAT = "diffmed-splits/1"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
                          "[0, 1) and leave some rows for training")


def make_splits(ds: LabelledSet, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Row indices per split; splits present in ``ds.split`` are kept, missing ones carved from train.

    Synthetic rows always go to train.
    """
    _check_fractions(val_fraction, test_fraction)
    synthetic = np.zeros(len(ds), bool) if ds.synthetic is None else np.asarray(ds.synthetic, bool)
    real = np.flatnonzero(~synthetic)
    given = {} if ds.split is None else {s: real[ds.split[real] == s] for s in SPLITS}
    given = {s: idx for s, idx in given.items() if len(idx)}
    if given and "train" not in given:
        raise DataError(f"'{ds.source}' gives a split ({', '.join(given)}) but no training rows; "
                        "mark some rows 'train' or drop data.split_column")
    pool = real[~np.isin(real, np.concatenate([given.get("val", []), given.get("test", [])]).astype(int))]
    out: dict[str, np.ndarray] = {}
    for step, (name, frac) in enumerate((("test", test_fraction), ("val", val_fraction))):
        if name in given:
            out[name] = given[name]
        else:
            pool, out[name] = _carve(pool, int(round(frac * len(real))), ds, np.random.default_rng([seed, step]))
    out["train"] = np.concatenate([pool, np.flatnonzero(synthetic)])
    return {s: sorted(int(i) for i in out[s]) for s in SPLITS}


def _carve(pool: np.ndarray, n_take: int, ds: LabelledSet, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` into (rest, taken) with about ``n_take`` rows taken, whole groups, per stratum."""
    if n_take <= 0 or len(pool) == 0:
        return pool, np.array([], dtype=int)
    key = ds.stratify_key()[pool]
    group_of = np.asarray(ds.groups)[pool] if ds.groups is not None else pool
    uniq, inverse = np.unique(group_of.astype(str), return_inverse=True)
    members = [[] for _ in uniq]
    for pos, g in enumerate(inverse):
        members[g].append(pos)
    # a group's stratum is its most common label (ties: the smallest)
    stratum = np.array([np.bincount(key[m] + 1).argmax() - 1 for m in members])
    labels, counts = np.unique(key, return_counts=True)
    quota = _largest_remainder(counts * n_take / len(pool), n_take)
    taken: list[int] = []
    for label, q in zip(labels, quota):
        groups = np.flatnonzero(stratum == label)
        rng.shuffle(groups)
        got = 0
        for g in groups:
            size = len(members[g])
            if got + size <= q or (got < q and got + size - q < q - got):  # take when it brings us closer
                taken.extend(members[g])
                got += size
    is_taken = np.zeros(len(pool), bool)
    is_taken[taken] = True
    return pool[~is_taken], pool[is_taken]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas summing to ``total`` that round ``shares`` fairly."""
    base = np.floor(shares).astype(int)
    order = np.argsort(-(shares - base), kind="stable")
    base[order[: total - base.sum()]] += 1
    return base


def subsample_train(indices: list[int], ds: LabelledSet, fraction: float, seed: int) -> list[int]:
    """A seeded, stratified ``fraction`` of ``indices`` (at least one row of every class present)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.train_fraction={fraction} must be in (0, 1]")
    indices = np.asarray(sorted(indices), dtype=int)
    if fraction == 1 or len(indices) == 0:
        return indices.tolist()
    rng = np.random.default_rng([seed, 7])
    key = ds.stratify_key()[indices]
    keep = []
    for label in np.unique(key):
        rows = indices[key == label]
        n = max(1, int(round(fraction * len(rows))))
        keep.extend(rng.choice(rows, size=n, replace=False).tolist())
    return sorted(int(i) for i in keep)


def _class_counts(ds: LabelledSet, idx: list[int]) -> dict[str, int]:
    counts = ds.subset(np.asarray(idx, dtype=int)).class_counts() if idx else np.zeros(len(ds.class_names), int)
    return {name: int(c) for name, c in zip(ds.class_names, counts)}


def _ids_sha1(ds: LabelledSet, splits: dict[str, list[int]]) -> str:
    h = hashlib.sha1()
    for s in SPLITS:
        h.update(f"{s}:".encode())
        h.update("\n".join(sorted(ds.ids[i] for i in splits.get(s, []))).encode())
    return h.hexdigest()


def save_splits(splits: dict[str, list[int]], path: str | Path, ds: LabelledSet, seed: int | None = None,
                extra: dict | None = None) -> None:
    """Write splits.json: the row ids per split plus a fingerprint (counts, class counts, seed, sha1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "source": ds.source,
        "fingerprint": {
            "seed": seed,
            "counts": {s: len(splits.get(s, [])) for s in SPLITS},
            "class_counts": {s: _class_counts(ds, splits.get(s, [])) for s in SPLITS},
            "ids_sha1": _ids_sha1(ds, splits),
        },
        **(extra or {}),
        "splits": {s: [ds.ids[i] for i in splits.get(s, [])] for s in SPLITS},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def load_splits(path: str | Path, ds: LabelledSet) -> dict[str, list[int]]:
    """Row indices per split from splits.json; DataError unless its ids are exactly the set's rows."""
    path = Path(path)
    fix = f"delete '{path}' to make a new split, or point data.source at the data it was made for"
    try:
        doc = json.loads(path.read_text())
        listed = {s: list(doc["splits"].get(s, [])) for s in SPLITS}
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise DataError(f"cannot read splits file '{path}' ({err}); {fix}") from None
    synthetic = np.zeros(len(ds), bool) if ds.synthetic is None else np.asarray(ds.synthetic, bool)
    index = {ds.ids[i]: i for i in np.flatnonzero(~synthetic)}
    skipped = {b.get("id") for b in ds.skipped}
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    where: dict[int, str] = {}
    unknown, twice = [], []
    for s, ids in listed.items():
        for rid in ids:
            i = index.get(rid)
            if i is None:
                if rid in skipped:
                    log.warning("splits file %s lists %s, which was skipped as unreadable", path, rid)
                else:
                    unknown.append(rid)
            elif i in where:
                twice.append(f"{rid} ({where[i]} and {s})")
            else:
                where[i] = s
                out[s].append(i)
    absent = [ds.ids[i] for i in index.values() if i not in where]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} id(s) in the file are not in the data (e.g. {', '.join(unknown[:3])})")
    if absent:
        problems.append(f"{len(absent)} row(s) of the data are in no split (e.g. {', '.join(absent[:3])})")
    if twice:
        problems.append(f"{len(twice)} id(s) are in two splits (e.g. {', '.join(twice[:3])})")
    if ds.split is not None:
        moved = [f"{ds.ids[i]} (given {ds.split[i]}, file {s})" for i, s in where.items()
                 if ds.split[i] in ("val", "test") and ds.split[i] != s]
        if moved:
            problems.append(f"{len(moved)} row(s) are not in the split the data gives (e.g. {', '.join(moved[:3])})")
    if problems:
        raise DataError(f"splits file '{path}' does not match '{ds.source}': " + "; ".join(problems) + f". {fix}")
    out["train"].extend(int(i) for i in np.flatnonzero(synthetic))
    saved = doc.get("fingerprint", {}).get("class_counts")
    if saved and ds.task != "multilabel" and saved != {s: _class_counts(ds, out[s]) for s in SPLITS}:
        log.warning("labels in %s changed since %s was written (class counts differ)", ds.source, path)
    return {s: sorted(v) for s, v in out.items()}


def resolve_splits(ds: LabelledSet, cfg: DataConfig | RunConfig, run_dir_or_path: str | Path) -> dict[str, list[int]]:
    """Load ``splits.json`` (a path, or the file in a run folder) if it exists, else make and save it.

    ``cfg`` is a DataConfig (or a RunConfig). The full split is returned; ``data.train_fraction`` is
    applied by the caller with :func:`subsample_train` so the file always holds the whole split.
    """
    cfg = getattr(cfg, "data", cfg)
    path = Path(run_dir_or_path)
    if path.suffix != ".json":
        path = path / "splits.json"
    if path.is_file():
        return load_splits(path, ds)
    splits = make_splits(ds, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    save_splits(splits, path, ds, seed=cfg.split_seed)
    return splits
