"""Atomic checkpoints and the exported model: safetensors weights + JSON metadata (the input contract).

Lightning ``.ckpt`` files (for resume) are written to a temporary file and moved into place, and are
loaded with ``weights_only=True``; exported weights are safetensors, so no file is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import load_file, save_file

from diffmed.errors import RunError

MODEL_DIR = "model"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Temp file + os.replace, so a kill mid-save leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import io

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)


def export_model(module: torch.nn.Module, run_dir: Path, meta: dict) -> Path:
    """Write ``model/model.safetensors`` and ``model/model.json`` (method, params, TaskSpec, calibration)."""
    out = run_dir / MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    atomic_write_json(out / "model.json", meta)
    return out


def read_model_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / MODEL_DIR / "model.json"
    if not path.is_file():
        raise RunError(f"'{run_dir}' has no trained model ({path} missing); run `diffmed train` first "
                       "or resume it with `diffmed train --resume RUN_DIR`")
    return json.loads(path.read_text())


def load_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / MODEL_DIR / "model.safetensors"))


def best_checkpoint_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint, loaded without unpickling code."""
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
