"""Class-targeted, resumable synthesis of training images from a trained generator.

The request is a number of images per class: ``per_class`` (the same for every class), ``balance_to``
(fill each class up to RATIO x the largest class's training count, from the counts saved with the
generator), or explicit ``counts``. Image k of class c is always ``images/<class>/<k:06d>.png`` and is
drawn from its own seed, derived from (seed, c, k); batches are fixed chunks of one class's indices.
So a killed run, re-run with the same command, keeps every image already written, regenerates only
the chunks that are incomplete, and ends with exactly the files an uninterrupted run writes (byte for
byte with the same batch size; with another batch size the same seeds are used, but floating-point
results of a different batch composition may differ in the last bit of a pixel).

Output: PNGs under ``out_dir/images/<class>/`` and ``out_dir/manifest.csv`` (columns path, label,
synthetic, generator_run, seed -- the image's own seed, guidance, steps, sampler), readable as a CSV data source
(path column ``path``, label column ``label``, image root ``out_dir/images``), e.g. for
``data.synthetic=[out_dir/manifest.csv]``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmed.diffusion.generative import load_generator, read_generator_meta
from diffmed.diffusion.sampling import sample
from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json
from diffmed.errors import ConfigError, RunError

log = logging.getLogger("diffmed.generate")
IMAGES_DIR = "images"
MANIFEST = "manifest.csv"
STATE_FILE = "generation.json"
MANIFEST_COLUMNS = ("path", "label", "synthetic", "generator_run", "seed", "guidance", "steps", "sampler")
_SAME_SETTINGS = ("generator_run", "seed", "steps", "sampler", "guidance", "eta")


@dataclass
class GenerationResult:
    out_dir: Path
    manifest: Path
    counts: dict[str, int]
    written: int
    """Images written by this call (a resumed run does not count the ones it kept)."""
    kept: int
    seconds: float
    """Wall time of sampling and writing (model loading excluded)."""
    files: list[Path] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def request_counts(class_names: list[str], train_counts: dict[str, int] | None, per_class: int | None = None,
                   balance_to: float | None = None, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Images to generate per class, from exactly one of per_class / balance_to / counts."""
    given = [name for name, v in (("--per-class", per_class), ("--balance-to", balance_to), ("--count", counts))
             if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of --per-class, --balance-to or --count (got {given or 'none'})")
    if per_class is not None:
        if per_class < 0:
            raise ConfigError(f"--per-class {per_class} must be >= 0")
        return {c: int(per_class) for c in class_names}
    if counts is not None:
        unknown = sorted(set(counts) - set(class_names))
        if unknown:
            raise ConfigError(f"--count names unknown class(es) {unknown}; the generator's classes are {class_names}")
        if any(not isinstance(n, int) or n < 0 for n in counts.values()):
            raise ConfigError(f"--count values must be whole numbers >= 0 (got {counts})")
        return {c: int(counts.get(c, 0)) for c in class_names}
    if balance_to <= 0:
        raise ConfigError(f"--balance-to {balance_to} must be > 0 (1.0 fills every class up to the largest)")
    if not train_counts:
        raise ConfigError("--balance-to needs the training class counts, which this generator's model.json lacks; "
                          "use --per-class or --count")
    target = math.ceil(balance_to * max(train_counts.values()))
    return {c: max(0, target - int(train_counts.get(c, 0))) for c in class_names}


def image_seed(seed: int, class_index: int, index: int) -> int:
    """A per-image seed from (seed, class, index): independent streams, stable across runs and machines."""
    a, b = np.random.SeedSequence([seed, class_index, index]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & (2**63 - 1)


def class_folders(class_names: list[str]) -> list[str]:
    """File-system-safe, unique folder names for the classes (order kept)."""
    out: list[str] = []
    for k, name in enumerate(class_names):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"class{k}"
        out.append(safe if safe not in out else f"{safe}_{k}")
    return out


def _png_bytes(image: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes (grey or RGB, 8 bit)."""
    arr = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _check_state(out_dir: Path, settings: dict) -> None:
    """Refuse to mix images made with other settings into one output folder."""
    state = out_dir / STATE_FILE
    if state.is_file():
        before = json.loads(state.read_text())
        changed = {k: (before.get(k), settings[k]) for k in _SAME_SETTINGS if before.get(k) != settings[k]}
        if changed:
            raise RunError(f"'{out_dir}' holds images generated with other settings {changed} (old, new); "
                           "use another output folder or the same settings to resume")
    elif (out_dir / IMAGES_DIR).is_dir() and any((out_dir / IMAGES_DIR).rglob("*.png")):
        raise RunError(f"'{out_dir}/{IMAGES_DIR}' already holds images not made by `diffmed generate`; "
                       "choose another output folder")


def _write_manifest(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def generate(run_dir: Path, out_dir: Path, per_class: int | None = None, balance_to: float | None = None,
             counts: dict[str, int] | None = None, steps: int = 50, sampler: str = "ddim", guidance: float = 1.0,
             seed: int = 0, batch_size: int = 64, eta: float = 0.0,
             device: torch.device | str | None = None) -> GenerationResult:
    """Generate class-targeted images from the generator of ``run_dir`` into ``out_dir`` (resumable)."""
    from diffmed.engine.inference import pick_device

    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir)
    meta = read_generator_meta(run_dir)
    names = list(meta["spec"]["class_names"])
    want = request_counts(names, meta.get("class_counts"), per_class, balance_to, counts)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    settings = {"generator_run": str(run_dir), "seed": seed, "steps": steps, "sampler": sampler,
                "guidance": guidance, "eta": eta}
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_state(out_dir, settings)
    atomic_write_json(out_dir / STATE_FILE, {**settings, "batch_size": batch_size, "counts": want})
    model = load_generator(run_dir, device or pick_device("auto"))
    folders = class_folders(names)
    rows, files, written, kept = [], [], 0, 0
    start = time.perf_counter()
    for k, (name, folder) in enumerate(zip(names, folders)):
        (out_dir / IMAGES_DIR / folder).mkdir(parents=True, exist_ok=True)
        for tmp in (out_dir / IMAGES_DIR / folder).glob(".*.png.*"):  # half-written files of a killed run
            tmp.unlink()
        for lo in range(0, want[name], batch_size):
            index = list(range(lo, min(lo + batch_size, want[name])))
            rel = [f"{folder}/{i:06d}.png" for i in index]
            seeds = [image_seed(seed, k, i) for i in index]
            missing = [j for j, r in enumerate(rel) if not (out_dir / IMAGES_DIR / r).is_file()]
            if missing:  # regenerate the whole chunk: same batch as an uninterrupted run, same bytes
                images = sample(model, torch.full((len(index),), k, dtype=torch.long),
                                generator=[torch.Generator().manual_seed(s) for s in seeds], steps=steps,
                                sampler=sampler, guidance_scale=guidance, eta=eta, batch_size=batch_size)
                for j in missing:
                    atomic_write_bytes(out_dir / IMAGES_DIR / rel[j], _png_bytes(images[j]))
            written += len(missing)
            kept += len(index) - len(missing)
            rows += [{"path": r, "label": name, "synthetic": 1, "generator_run": str(run_dir), "seed": s,
                      "guidance": guidance, "steps": steps, "sampler": sampler} for r, s in zip(rel, seeds)]
            files += [out_dir / IMAGES_DIR / r for r in rel]
    seconds = time.perf_counter() - start
    _write_manifest(out_dir / MANIFEST, rows)
    result = GenerationResult(out_dir, out_dir / MANIFEST, want, written, kept, seconds, files)
    atomic_write_json(out_dir / STATE_FILE, {**settings, "batch_size": batch_size, "counts": want,
                                             "written": written, "kept": kept,
                                             "images_per_second": result.images_per_second})
    log.info("generated %d images (%d kept) in %.1fs (%.2f images/s) -> %s", written, kept, seconds,
             result.images_per_second, out_dir)
    return result
