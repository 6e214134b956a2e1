"""Dataset fingerprint: what a run actually trained on, and the leaks that would inflate its scores.

The fingerprint (counts per class and split, imbalance, image format, intensity range, skipped
files, identical images across splits and identical images with conflicting labels) is written next
to every run. Row ids are file paths or npz indices only, never DICOM header values.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from diffmed.config import DataConfig, RunConfig
from diffmed.data.types import SPLITS, LabelledSet

MAX_LISTED = 50
"""Duplicate pairs / conflicting groups listed in full (all are counted)."""
_CHUNK = 512


def _intensity(images: np.ndarray, idx: list[int]) -> dict:
    """min/max/mean over ``images[idx]`` in chunks (no float copy of a whole split)."""
    if not idx:
        return {"min": None, "max": None, "mean": None}
    lo, hi, total, count = np.inf, -np.inf, 0.0, 0
    for start in range(0, len(idx), _CHUNK):
        block = images[np.asarray(idx[start:start + _CHUNK])]
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        total += float(block.sum(dtype=np.float64))
        count += block.size
    return {"min": lo, "max": hi, "mean": round(total / count, 3)}


def _label_text(ds: LabelledSet, i: int):
    if ds.task == "multilabel":
        return [None if np.isnan(v) else float(v) for v in np.asarray(ds.targets[i], dtype=np.float64)]
    return ds.class_names[int(ds.targets[i])]


def _same_label(ds: LabelledSet, rows: list[int]) -> bool:
    t = np.asarray(ds.targets[rows], dtype=np.float64).reshape(len(rows), -1)
    return bool(np.all((t == t[0]) | (np.isnan(t) & np.isnan(t[0]))))


def _duplicates(ds: LabelledSet, split_of: dict[int, str]) -> tuple[dict, dict]:
    """Identical images (sha1 of the array bytes) across splits, and with conflicting labels."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in sorted(split_of):
        by_hash[hashlib.sha1(np.ascontiguousarray(ds.images[i]).tobytes()).hexdigest()].append(i)
    pairs, n_pairs, conflicts, n_conflicts = [], 0, [], 0
    for rows in by_hash.values():
        if len(rows) < 2:
            continue
        for a, b in combinations(rows, 2):
            if split_of[a] != split_of[b]:
                n_pairs += 1
                if len(pairs) < MAX_LISTED:
                    pairs.append({"a": ds.ids[a], "a_split": split_of[a], "b": ds.ids[b], "b_split": split_of[b]})
        if not _same_label(ds, rows):
            n_conflicts += 1
            if len(conflicts) < MAX_LISTED:
                conflicts.append({"ids": [ds.ids[i] for i in rows], "splits": [split_of[i] for i in rows],
                                  "labels": [_label_text(ds, i) for i in rows]})
    return {"count": n_pairs, "pairs": pairs}, {"count": n_conflicts, "groups": conflicts}


def _groups_across(ds: LabelledSet, split_of: dict[int, str]) -> dict:
    """Patients/lesions with images in more than one split (possible only when the data gave the split)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for i, s in split_of.items():
        seen[str(ds.groups[i])].add(s)
    bad = sorted(g for g, ss in seen.items() if len(ss) > 1)
    return {"count": len(bad), "groups": [{"group": g, "splits": sorted(seen[g])} for g in bad[:MAX_LISTED]]}


def fingerprint(ds: LabelledSet, splits: dict[str, list[int]]) -> dict:
    """Plain-JSON summary of a split dataset (see the module docstring)."""
    split_of = {int(i): s for s in SPLITS for i in splits.get(s, [])}
    counts = {s: {n: int(c) for n, c in zip(ds.class_names, ds.subset(np.asarray(splits.get(s, []), int)).class_counts())}
              for s in SPLITS}
    train = [counts["train"][n] for n in ds.class_names]
    ratio = round(max(train) / min(train), 3) if train and min(train) > 0 else None
    dups, conflicts = _duplicates(ds, split_of)
    fp = {
        "source": ds.source,
        "task": ds.task,
        "class_names": list(ds.class_names),
        "n_images": len(ds),
        "image": {"height": int(ds.images.shape[1]), "width": int(ds.images.shape[2]),
                  "channels": ds.channels, "dtype": str(ds.images.dtype)},
        "split_sizes": {s: len(splits.get(s, [])) for s in SPLITS},
        "unused_rows": len(ds) - len(split_of),
        "class_counts": counts,
        "imbalance_ratio": ratio,
        "intensity": {s: _intensity(ds.images, list(splits.get(s, []))) for s in SPLITS},
        "skipped": {"count": len(ds.skipped),
                    "files": [{k: b.get(k) for k in ("file", "row", "reason")} for b in ds.skipped]},
        "duplicates_across_splits": dups,
        "conflicting_labels": conflicts,
    }
    if ds.groups is not None:
        fp["groups_across_splits"] = _groups_across(ds, split_of)
    if ds.task == "multilabel":
        t = np.asarray(ds.targets, dtype=np.float64)
        for name, test in (("uncertain_counts", lambda x: x == -1), ("missing_counts", np.isnan)):
            fp[name] = {s: {n: int(v) for n, v in zip(ds.class_names, test(t[splits.get(s, [])]).sum(0))}
                        for s in SPLITS}
    return fp


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
    return [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]


def format_fingerprint(fp: dict) -> str:
    """The fingerprint as a plain-text report (no colour, no rich)."""
    im = fp["image"]
    lines = [f"Dataset: {fp['source']}",
             f"Task: {fp['task']}, {len(fp['class_names'])} classes, {fp['n_images']} images "
             f"{im['height']}x{im['width']}x{im['channels']} {im['dtype']}", ""]
    what = "positives per label" if fp["task"] == "multilabel" else "images per class"
    rows = [[n] + [fp["class_counts"][s][n] for s in SPLITS] + [sum(fp["class_counts"][s][n] for s in SPLITS)]
            for n in fp["class_names"]]
    rows.append(["(rows)"] + [fp["split_sizes"][s] for s in SPLITS] + [sum(fp["split_sizes"].values())])
    lines += [f"Counts ({what}):"] + _table(["class", *SPLITS, "total"], rows) + [""]
    ratio = fp["imbalance_ratio"]
    lines.append("Imbalance ratio (train, max/min): " + (f"{ratio:g}" if ratio is not None else
                                                          "undefined (a class has no training images)"))
    if fp.get("unused_rows"):
        lines.append(f"Rows in no split (train_fraction): {fp['unused_rows']}")
    lines.append("")
    rows = [[s, *(("-" if v is None else f"{v:g}") for v in fp["intensity"][s].values())] for s in SPLITS]
    lines += ["Intensity:"] + _table(["split", "min", "max", "mean"], rows) + [""]
    sk = fp["skipped"]
    lines.append(f"Unreadable files skipped: {sk['count']}")
    lines += [f"  {b['file']}" + (f" (row {b['row']})" if b.get("row") else "") + f": {b['reason']}"
              for b in sk["files"][:MAX_LISTED]]
    d = fp["duplicates_across_splits"]
    lines.append(f"Identical images across splits: {d['count']}")
    lines += [f"  {p['a']} ({p['a_split']}) == {p['b']} ({p['b_split']})" for p in d["pairs"]]
    if "groups_across_splits" in fp:
        g = fp["groups_across_splits"]
        lines.append(f"Groups (patients/lesions) in more than one split: {g['count']}")
        lines += [f"  {x['group']}: {', '.join(x['splits'])}" for x in g["groups"]]
    c = fp["conflicting_labels"]
    lines.append(f"Identical images with conflicting labels: {c['count']}")
    lines += ["  " + ", ".join(f"{i} ({s}: {lab})" for i, s, lab in zip(g["ids"], g["splits"], g["labels"]))
              for g in c["groups"]]
    return "\n".join(lines)


def check_dataset(cfg: DataConfig | RunConfig, out_dir: str | Path) -> dict:
    """Load the data of ``cfg`` (DataConfig or RunConfig), split it (out_dir/splits.json, reused if
    present) and write out_dir/fingerprint.json; returns the fingerprint."""
    from diffmed.data.sources import load_source
    from diffmed.data.splits import resolve_splits

    cfg = getattr(cfg, "data", cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_source(cfg)
    splits = resolve_splits(ds, cfg, out_dir / "splits.json")
    fp = fingerprint(ds, splits)
    (out_dir / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    return fp
