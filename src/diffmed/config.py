"""Typed run configuration: YAML defaults, then ``key.sub=value`` overrides; unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffmed.errors import ConfigError

Task = Literal["binary", "multiclass", "multilabel", "ordinal"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where the images are and how to read them."""

    source: str = "pneumoniamnist"
    """A MedMNIST ``.npz``, a MedMNIST name (``pneumoniamnist``), a CSV manifest, or an image folder."""
    csv: str | None = None
    """Manifest CSV for an image folder (default: ``labels.csv`` inside the folder if present)."""
    image_root: str | None = None
    """Folder the manifest's paths are relative to (default: ``images/`` beside the CSV if present, else the CSV's folder)."""
    path_column: str = "path"
    label_columns: list[str] = Field(default_factory=lambda: ["label"])
    group_column: str | None = None
    """Patient or lesion id: splits never separate images of one group."""
    split_column: str | None = None
    task: Task | None = None
    """Inferred when unset: several label columns -> multilabel, two classes -> binary, else multiclass."""
    class_names: list[str] | None = None
    """Label order; for ordinal tasks the order is the grade order."""
    image_size: int = 28
    channels: Literal[1, 3] | None = None
    """Model input channels; default: those of the data (grey 1, colour 3)."""
    uncertain_policy: str | dict[str, str] = "ignore"
    """Multi-label -1 entries: ignore | zeros | ones | multiclass | selftrained, or a mapping per column."""
    missing_policy: Literal["ignore", "fill0", "fill1"] = "fill0"
    """Multi-label blank entries (not mentioned): FillNM(0|1) or masked out."""
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_bad_files: int = 0
    """Unreadable images to skip (each logged with file and row) before the run stops."""
    dicom_window: tuple[float, float] | None = None
    """DICOM (center, width); default: the header's window, else the full range."""
    synthetic: list[str] = Field(default_factory=list)
    """Manifests written by ``diffmed generate``: mixed into the training split only."""
    synthetic_ratio: float | None = None
    """Synthetic images per real training image (None: use all)."""
    train_fraction: float = 1.0
    """Use a seeded, stratified share of the training split (scarce-label experiments)."""
    num_workers: int = 0


class AugmentConfig(Strict):
    policy: Literal["none", "flip", "standard", "traditional"] = "none"
    """none; flip (horizontal); standard (flip + small affine); traditional (the thesis's combined policy)."""
    methods: list[str] | None = None
    """Traditional methods to apply instead of the combined policy's (rotation, flipping, ...)."""
    p: float = 0.5
    """Probability of each traditional method."""


class MethodConfig(Strict):
    name: str = "baseline"
    params: dict[str, Any] = Field(default_factory=dict)
    """Method-specific options, validated by the method's own ``Params``."""


class OptimConfig(Strict):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["none", "cosine", "step"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    """Step schedule: fractions of max_epochs where the lr is multiplied by ``gamma``."""
    gamma: float = 0.1
    warmup_epochs: int = 0


class TrainConfig(Strict):
    max_epochs: int = 20
    batch_size: int = 128
    seed: int = 0
    monitor: str = "val/auc"
    """Validation metric for the best checkpoint and early stopping (never a test metric)."""
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping_patience: int | None = None
    ema_decay: float | None = None
    precision: str = "auto"
    """auto: bf16-mixed on CUDA with bf16 support, else 32."""
    grad_clip: float | None = None
    devices: int | str = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    progress: bool = True
    limit_train_batches: int | float | None = None
    deterministic: bool = True


class EvalConfig(Strict):
    bootstrap: int = 1000
    ci_level: float = 0.95


class RunConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.max_epochs=5`` -> ("train.max_epochs", 5); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value, e.g. train.max_epochs=5")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def parse_key_values(items: list[str] | None, option: str) -> dict:
    """``["a=1", "b=x"]`` -> {"a": 1, "b": "x"} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        try:
            key, value = parse_override(item)
        except ConfigError:
            raise ConfigError(f"{option} '{item}' must look like key=value") from None
        out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Resolve a config: YAML file (optional), then overrides; unknown keys raise ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found")
        tree = yaml.safe_load(path.read_text()) or {}
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {prefix[:-1]: [_portable(v) for v in tree]}
    return {prefix[:-1]: _portable(tree)}


def _portable(value: Any) -> Any:
    """A path by its last two parts: a run folder moved to another machine or folder still matches."""
    return "/".join(Path(value).parts[-2:]) if isinstance(value, str) and "/" in value else value


def config_changes(saved: RunConfig, planned: RunConfig) -> list[str]:
    """The settings in which ``planned`` differs from ``saved``, as ``key: saved -> planned``."""
    old, new = _flat(saved.model_dump(mode="json")), _flat(planned.model_dump(mode="json"))
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
