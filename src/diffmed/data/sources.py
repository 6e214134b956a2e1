"""Turn any supported data source into one LabelledSet.

Sources: a MedMNIST ``.npz`` (official split and label names kept), a MedMNIST name (file looked up
in ``$DIFFMED_DATA``, downloaded if possible), a CSV manifest (or a folder holding ``labels.csv``),
or a plain class-per-subfolder tree. Every user-facing error names the file and, for manifests,
the CSV row as a spreadsheet shows it (row 2 = first data row).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from diffmed.config import DataConfig
from diffmed.data.images import IMAGE_SUFFIXES, convert_channels, is_dicom, read_image, resize_array
from diffmed.data.types import SPLITS, LabelledSet
from diffmed.errors import ConfigError, DataError

log = logging.getLogger("diffmed.data")

READ_THREADS = 4
"""Threads decoding images (PIL and pydicom release the GIL while decoding)."""
_SHOW_BAD = 5
_MEDMNIST_TASKS = {"binary-class": "binary", "multi-class": "multiclass", "ordinal-regression": "ordinal",
                   "multi-label, binary-class": "multilabel"}


def load_source(cfg: DataConfig, allow_empty_classes: bool = False) -> LabelledSet:
    """Load ``cfg.source`` (npz file, MedMNIST name, CSV, folder with labels.csv, or class folders).

    ``allow_empty_classes``: classes of ``cfg.class_names`` may have no images (synthetic manifests
    that hold only the generated minority classes, loaded with the real set's class order).
    """
    src = Path(cfg.source).expanduser()
    if src.suffix.lower() == ".npz":
        if not src.is_file() and src.name == cfg.source and (data_folder() / src.name).is_file():
            src = data_folder() / src.name  # a bare file name: also looked for in $DIFFMED_DATA
        if not src.is_file():
            raise DataError(f"MedMNIST file '{src}' not found; check data.source")
        return load_npz(src, cfg)
    if src.is_dir():
        csv = _folder_csv(src, cfg.csv)
        if csv is not None:
            return load_csv(csv, cfg, allow_empty_classes)
        return load_class_folders(src, cfg, allow_empty_classes)
    if src.is_file():
        if src.suffix.lower() in (".csv", ".tsv", ".txt"):
            return load_csv(src, cfg, allow_empty_classes)
        raise DataError(f"data source '{src}' is neither a .npz, a .csv manifest nor a folder")
    if os.sep not in cfg.source and "/" not in cfg.source and not src.suffix:
        return load_npz(medmnist_file(cfg.source), cfg)
    raise DataError(f"data source '{src}' not found: give a MedMNIST .npz, a MedMNIST name "
                    "(e.g. pneumoniamnist), a CSV manifest, or an image folder")


# ---------------------------------------------------------------- MedMNIST


def _medmnist_info() -> dict:
    from medmnist import INFO  # imported lazily: the medmnist package pulls in torch

    return INFO


def medmnist_key(stem: str) -> str | None:
    """INFO entry for a file stem: exact, else the longest INFO name the stem starts with."""
    info, stem = _medmnist_info(), stem.lower()
    if stem in info:
        return stem
    matches = [k for k in info if stem.startswith(k)]
    return max(matches, key=len) if matches else None


def data_folder() -> Path:
    """Where MedMNIST files are looked for and downloaded: $DIFFMED_DATA, else ~/.diffmed/data."""
    return Path(os.environ.get("DIFFMED_DATA") or "~/.diffmed/data").expanduser()


def _download_medmnist(name: str, folder: Path) -> None:
    """Ask the medmnist package to fetch ``<name>.npz`` (28 px) into ``folder``."""
    import medmnist

    folder.mkdir(parents=True, exist_ok=True)
    getattr(medmnist, _medmnist_info()[name]["python_class"])(split="train", download=True,
                                                              root=str(folder), size=28)


def medmnist_file(name: str) -> Path:
    """Path of ``<name>.npz`` in the data folder, downloading it when missing (DataError if offline)."""
    name = name.lower()
    path = data_folder() / f"{name}.npz"
    if path.is_file():
        return path
    info = _medmnist_info()
    key = name if name in info else None
    if key is None:
        known = ", ".join(k for k in info if not k.endswith("3d"))
        raise DataError(f"data source '{name}' is not a file or folder, and {path} does not exist; "
                        f"MedMNIST names are: {known}")
    pretty = info[key]["python_class"]
    try:
        _download_medmnist(key, path.parent)
    except Exception as err:  # offline, proxy, disk full: the message below says what to do
        log.debug("MedMNIST download of %s failed: %s", key, err)
    if not path.is_file():
        raise DataError(f"{pretty} file not found at {path} and it could not be downloaded (offline?). "
                        f"Put {name}.npz there, set DIFFMED_DATA, or pass the file path with --data")
    return path


def load_npz(path: Path, cfg: DataConfig) -> LabelledSet:
    """A MedMNIST-format npz: official train/val/test kept in ``split``, ids like 'train/17'."""
    try:
        with np.load(path) as z:
            parts = {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in SPLITS
                     if f"{s}_images" in z.files and f"{s}_labels" in z.files}
            keys = list(z.files)
    except Exception as err:
        raise DataError(f"cannot read '{path}' as a MedMNIST .npz ({err}); re-download it") from None
    if not parts:
        raise DataError(f"'{path}' has none of the MedMNIST keys train_images/train_labels/val_images/... "
                        f"(it has {keys})")
    images, labels, split, ids = [], [], [], []
    for s, (imgs, labs) in parts.items():
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
            raise DataError(f"'{path}': {s}_images has shape {imgs.shape}; only 2-D grey or RGB MedMNIST "
                            "images (N, H, W[, 3]) are supported, not 3-D volumes")
        if len(labs) != len(imgs):
            raise DataError(f"'{path}': {s}_images has {len(imgs)} rows but {s}_labels has {len(labs)}")
        images.append(imgs)
        labels.append(labs.reshape(len(labs), -1))
        split += [s] * len(imgs)
        ids += [f"{s}/{i}" for i in range(len(imgs))]
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
        images = np.stack([resize_array(im, cfg.image_size) for im in images])
    images = convert_channels(images, cfg.channels)

    key = medmnist_key(path.stem)
    entry = _medmnist_info()[key] if key else None
    multilabel = labels.shape[1] > 1
    if entry is not None:
        task = _MEDMNIST_TASKS.get(entry["task"], "multilabel" if multilabel else "multiclass")
        names = [entry["label"][k] for k in entry["label"]]
    else:
        task = "multilabel" if multilabel else ("binary" if labels.max() <= 1 else "multiclass")
        names = [str(i) for i in range(labels.shape[1] if multilabel else int(labels.max()) + 1)]
    if multilabel:
        targets = labels.astype(np.float32)
    else:
        targets = labels[:, 0].astype(np.int64)
        if targets.min() < 0 or targets.max() >= len(names):
            raise DataError(f"'{path}': labels range {targets.min()}..{targets.max()} but there are "
                            f"{len(names)} classes {names}")
    if cfg.class_names is not None:
        if len(cfg.class_names) != len(names):
            raise ConfigError(f"data.class_names has {len(cfg.class_names)} names but '{path}' has "
                              f"{len(names)} classes ({names})")
        names = list(cfg.class_names)
    task = _forced_task(task, cfg.task, multilabel, len(names), str(path))
    return LabelledSet(images=np.ascontiguousarray(images), targets=targets, task=task, class_names=names,
                       ids=ids, split=np.array(split, dtype=object), source=str(path))


def _forced_task(inferred: str, forced: str | None, multilabel: bool, n_classes: int, where: str) -> str:
    """Apply ``data.task`` over the inferred task where it fits the labels."""
    if forced is None or forced == inferred:
        return inferred
    if multilabel != (forced == "multilabel"):
        kind = "several label columns" if multilabel else "one label per image"
        raise ConfigError(f"data.task={forced} does not fit '{where}', which has {kind}; "
                          f"leave data.task unset to use '{inferred}'")
    if forced == "binary" and n_classes != 2:
        raise ConfigError(f"data.task=binary but '{where}' has {n_classes} classes; use multiclass or ordinal")
    return forced


# ---------------------------------------------------------------- CSV manifests


def _folder_csv(folder: Path, csv: str | None) -> Path | None:
    if csv is None:
        default = folder / "labels.csv"
        return default if default.is_file() else None
    for candidate in (folder / csv, Path(csv).expanduser()):
        if candidate.is_file():
            return candidate
    raise DataError(f"data.csv='{csv}' not found in '{folder}' nor as a path")


def _image_root(csv: Path, image_root: str | None) -> Path:
    if image_root is None:
        images = csv.parent / "images"
        return images if images.is_dir() else csv.parent
    root = Path(image_root).expanduser()
    if not root.is_absolute() and (csv.parent / root).is_dir():
        root = csv.parent / root
    if not root.is_dir():
        raise DataError(f"data.image_root '{image_root}' is not a folder (manifest '{csv}')")
    return root


def _row(i: int) -> int:
    """Data row index -> the row number a spreadsheet shows (header is row 1)."""
    return i + 2


def _natural_sorted(values) -> list[str]:
    """Numbers sort as numbers ('2' before '10'), anything else alphabetically."""
    values = list(values)
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def load_csv(csv: Path, cfg: DataConfig, allow_empty_classes: bool = False) -> LabelledSet:
    """A manifest: one row per image, paths relative to the image root, labels in label_columns."""
    import pandas as pd

    sep = "\t" if csv.suffix.lower() == ".tsv" else ","
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, sep=sep)
    except Exception as err:
        raise DataError(f"cannot read manifest '{csv}' ({err})") from None
    if len(df) == 0:
        raise DataError(f"manifest '{csv}' has no data rows")
    df.columns = [c.strip() for c in df.columns]
    columns = list(df.columns)

    def need(col: str, option: str) -> None:
        if col not in df.columns:
            raise DataError(f"manifest '{csv}' has no column '{col}' ({option}); its columns are {columns}")

    need(cfg.path_column, "data.path_column")
    for col in cfg.label_columns:
        need(col, "data.label_columns")
    if cfg.group_column:
        need(cfg.group_column, "data.group_column")
    if cfg.split_column:
        need(cfg.split_column, "data.split_column")
    root = _image_root(csv, cfg.image_root)
    paths = [p.strip() for p in df[cfg.path_column]]
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        if not p:
            raise DataError(f"manifest '{csv}' row {_row(i)}: empty '{cfg.path_column}'")
        if p in seen:
            raise DataError(f"manifest '{csv}' rows {_row(seen[p])} and {_row(i)} both list '{p}'; "
                            "remove the duplicate row")
        seen[p] = i

    multilabel = len(cfg.label_columns) > 1 or cfg.task == "multilabel"
    if multilabel:
        targets = _multilabel_targets(df, cfg.label_columns, csv)
        if cfg.class_names is not None and list(cfg.class_names) != list(cfg.label_columns):
            raise ConfigError("for multi-label data the class names are the label columns "
                              f"{cfg.label_columns}; drop data.class_names or make it equal to them")
        names, task = list(cfg.label_columns), "multilabel"
    else:
        targets, names = _single_targets(df, cfg.label_columns[0], cfg.class_names, csv)
        if not allow_empty_classes:
            _check_no_empty_class(targets, names, str(csv), after_skip=False)
        task = "binary" if len(names) == 2 else "multiclass"
    task = _forced_task(task, cfg.task, multilabel, len(names), str(csv))

    split = None
    if cfg.split_column:
        split = np.empty(len(df), dtype=object)
        for i, v in enumerate(df[cfg.split_column]):
            v = v.strip().lower()
            if v not in SPLITS:
                raise DataError(f"manifest '{csv}' row {_row(i)}: split '{v}' in column '{cfg.split_column}' "
                                "must be train, val or test")
            split[i] = v
    groups = None
    if cfg.group_column:  # a blank group id makes the image its own group
        groups = np.array([g.strip() or f"row{_row(i)}" for i, g in enumerate(df[cfg.group_column])],
                          dtype=object)

    files = [Path(p) if Path(p).is_absolute() else root / p for p in paths]
    images, keep, skipped = read_images(files, [_row(i) for i in range(len(df))], paths, cfg, str(csv))
    keep = np.asarray(keep, dtype=int)
    ds = LabelledSet(images=images, targets=targets[keep], task=task, class_names=names,
                     ids=[paths[i] for i in keep], split=None if split is None else split[keep],
                     groups=None if groups is None else groups[keep], source=str(csv), skipped=skipped)
    if not multilabel and not allow_empty_classes:
        _check_no_empty_class(ds.targets, names, str(csv), after_skip=bool(skipped))
    return ds


def _single_targets(df, col: str, class_names: list[str] | None, csv: Path) -> tuple[np.ndarray, list[str]]:
    values = [v.strip() for v in df[col]]
    for i, v in enumerate(values):
        if not v:
            raise DataError(f"manifest '{csv}' row {_row(i)}: empty label in column '{col}'; "
                            "fill it in or remove the row")
    if class_names is None:
        names = _natural_sorted(set(values))
    else:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.class_names {names} lists a class twice")
        known = set(names)
        for i, v in enumerate(values):
            if v not in known:
                raise DataError(f"manifest '{csv}' row {_row(i)}: label '{v}' in column '{col}' is not one of "
                                f"data.class_names {names}; add it there or fix the row")
    index = {n: k for k, n in enumerate(names)}
    targets = np.array([index[v] for v in values], dtype=np.int64)
    return targets, names


def _check_no_empty_class(targets: np.ndarray, names: list[str], where: str, after_skip: bool) -> None:
    if len(names) < 2:
        raise DataError(f"'{where}' has a single class {names}; a classifier needs at least two "
                        "(check data.label_columns)")
    counts = np.bincount(targets, minlength=len(names))
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        why = " after skipping unreadable images" if after_skip else ""
        raise DataError(f"class(es) {empty} have no images in '{where}'{why}; remove them from "
                        "data.class_names or add images of them")


def _multilabel_targets(df, cols: list[str], csv: Path) -> np.ndarray:
    """1 positive, 0 negative, -1 uncertain, blank -> NaN (not mentioned)."""
    out = np.empty((len(df), len(cols)), np.float32)
    for c, col in enumerate(cols):
        for i, v in enumerate(df[col]):
            v = v.strip()
            if v == "" or v.lower() in ("nan", "na"):
                out[i, c] = np.nan
                continue
            try:
                x = float(v)
            except ValueError:
                x = None
            if x not in (1.0, 0.0, -1.0):
                raise DataError(f"manifest '{csv}' row {_row(i)}: value '{v}' in label column '{col}' must be "
                                "1, 0, -1 (uncertain) or blank (not mentioned)")
            out[i, c] = x
    return out


# ---------------------------------------------------------------- class folders


def _is_image_file(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or (path.suffix == "" and is_dicom(path))


def load_class_folders(folder: Path, cfg: DataConfig, allow_empty_classes: bool = False) -> LabelledSet:
    """``folder/<class>/**/image``: the subfolder name is the label."""
    found = {d.name: sorted(p for p in d.rglob("*") if _is_image_file(p))
             for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise DataError(f"'{folder}' has no labels.csv and no class subfolders with images; put images in "
                        "<folder>/<class>/ or add a labels.csv manifest")
    if cfg.class_names is None:
        names = _natural_sorted(found)
    else:
        names = [str(c) for c in cfg.class_names]
        extra = [k for k in found if k not in names]
        if extra:
            raise DataError(f"'{folder}' has class folder(s) {extra} not in data.class_names {names}; "
                            "add them there or move the folders away")
        missing = [n for n in names if n not in found]
        if missing and not allow_empty_classes:
            raise DataError(f"class(es) {missing} in data.class_names have no images in '{folder}' "
                            "(no such subfolder, or it is empty)")
    files = [p for n in names for p in found.get(n, [])]
    labels = np.array([k for k, n in enumerate(names) for _ in found.get(n, [])], dtype=np.int64)
    ids = [f.relative_to(folder).as_posix() for f in files]
    images, keep, skipped = read_images(files, [None] * len(files), ids, cfg, str(folder))
    keep = np.asarray(keep, dtype=int)
    task = _forced_task("binary" if len(names) == 2 else "multiclass", cfg.task, False, len(names), str(folder))
    ds = LabelledSet(images=images, targets=labels[keep], task=task, class_names=names,
                     ids=[ids[i] for i in keep], source=str(folder),
                     skipped=skipped)
    if not allow_empty_classes:
        _check_no_empty_class(ds.targets, names, str(folder), after_skip=bool(skipped))
    return ds


# ---------------------------------------------------------------- decoding


def read_images(files: list[Path], rows: list[int | None], ids: list[str], cfg: DataConfig,
                where: str) -> tuple[np.ndarray, list[int], list[dict]]:
    """Decode ``files`` on a thread pool (results in input order).

    Returns the stacked images, the indices of the files read, and the skipped ones
    (file, row, reason). More than ``cfg.max_bad_files`` failures raise a DataError listing them.
    """
    def decode(path: Path):
        try:
            return read_image(path, cfg.channels, cfg.image_size, cfg.dicom_window)
        except DataError as err:
            return getattr(err, "reason", str(err))

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(pool.map(decode, files))
    bad = [{"id": rid, "file": str(f), "row": r, "reason": res}
           for f, r, rid, res in zip(files, rows, ids, results) if isinstance(res, str)]
    if len(bad) > cfg.max_bad_files:
        lines = "\n".join(f"  {_where(b)}: {b['reason']}" for b in bad[:_SHOW_BAD])
        more = f"\n  ... and {len(bad) - _SHOW_BAD} more" if len(bad) > _SHOW_BAD else ""
        raise DataError(f"{len(bad)} image(s) listed by '{where}' could not be read "
                        f"(data.max_bad_files={cfg.max_bad_files}):\n{lines}{more}\n"
                        f"Fix or remove them, or set data.max_bad_files={len(bad)} to skip them")
    for b in bad:
        log.warning("skipping unreadable image %s: %s", _where(b), b["reason"])
    keep = [i for i, res in enumerate(results) if not isinstance(res, str)]
    if not keep:
        raise DataError(f"no image listed by '{where}' could be read")
    arrays = _harmonise([results[i] for i in keep])
    return arrays, keep, bad


def _where(bad: dict) -> str:
    return f"row {bad['row']} ({bad['file']})" if bad["row"] is not None else bad["file"]


def _harmonise(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack images of one dataset: grey ones become RGB if any is colour, uint8 -> uint16 if any is 16-bit."""
    channels = max(a.shape[-1] for a in arrays)
    wide = any(a.dtype == np.uint16 for a in arrays)
    out = np.empty((len(arrays), *arrays[0].shape[:2], channels), np.uint16 if wide else np.uint8)
    for i, a in enumerate(arrays):
        a = convert_channels(a, channels)
        out[i] = a.astype(np.uint16) * 257 if wide and a.dtype == np.uint8 else a
    return out
