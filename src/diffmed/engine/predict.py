"""Predict on new images with a trained run: preprocessing is rebuilt from the model's input contract."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffmed.data.dataset import normalize, to_tensor
from diffmed.data.images import read_image
from diffmed.data.types import TaskSpec
from diffmed.engine.evaluate import calibrated_probs, predictions_frame
from diffmed.engine.inference import pick_device
from diffmed.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}


def expand_inputs(inputs: list[str | Path], csv: str | Path | None = None, path_column: str = "path") -> list[Path]:
    """Image files from paths, folders (recursively) and an optional CSV column of paths."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"input '{item}' does not exist")
    if csv is not None:
        table = pd.read_csv(csv)
        if path_column not in table.columns:
            raise DataError(f"{csv}: no column '{path_column}' (columns: {', '.join(table.columns)}); "
                            "pass --path-column")
        paths += [Path(csv).parent / p for p in table[path_column]]
    if not paths:
        raise DataError("no images to predict: pass image files, folders or --csv")
    return paths


@torch.inference_mode()
def predict_images(method, meta: dict, paths: list[Path], batch_size: int = 64) -> pd.DataFrame:
    """Calibrated probabilities, predicted class and confidence per image (no labels needed)."""
    spec = TaskSpec.from_dict(meta)
    device = pick_device()
    method.to(device).eval()
    logits = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        arrays = [read_image(p, spec.channels, spec.image_size) for p in chunk]
        batch = torch.cat([to_tensor(a[None], 65535 if a.dtype == np.uint16 else 255) for a in arrays])
        logits.append(method.predict_logits(normalize(batch, spec).to(device)).float().cpu())
    probs = calibrated_probs(torch.cat(logits).numpy(), spec, meta.get("temperature") or 1.0)
    return predictions_frame([str(p) for p in paths], probs, spec, thresholds=meta.get("thresholds"))
