"""A training run end to end: folder, data, stages, fit, best weights, calibration, test metrics, report."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from diffmed.config import RunConfig, load_config, save_config
from diffmed.data.types import TaskSpec
from diffmed.engine.checkpoint import (atomic_write_json, best_checkpoint_state, export_model, load_state,
                                       read_model_meta)
from diffmed.engine.data import PreparedData, make_datamodule, prepare_data
from diffmed.engine.evaluate import evaluate_split, write_test_results
from diffmed.engine.inference import collect_outputs
from diffmed.engine.seed import seed_all
from diffmed.engine.trainer import CKPT_DIR, build_trainer, training_clock
from diffmed.errors import RunError
from diffmed.methods import StageContext, create_method, method_params, saved_method_params

log = logging.getLogger("diffmed.engine")
CONFIG_FILE = "config.yaml"
RUN_DIR_ENV = "DIFFMED_RUN_DIR"


def is_ddp_child() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def open_run_dir(run_dir: Path, resume: bool, command: str = "diffmed train") -> Path:
    """Create a new run folder (never reusing a finished one) or check a folder to resume."""
    run_dir = Path(os.environ.get(RUN_DIR_ENV, run_dir)) if is_ddp_child() else Path(run_dir)
    if resume or is_ddp_child():
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunError(f"cannot resume '{run_dir}': it has no {CONFIG_FILE}; start a new run with "
                           f"`{command}` instead")
        return run_dir
    if (run_dir / CONFIG_FILE).exists():  # a folder with only `data check` output may be trained into
        raise RunError(f"run folder '{run_dir}' already holds a run; choose another --out, or "
                       f"continue it with `{command} --resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # DDP children re-run the command: same folder
    return run_dir


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build_method(cfg: RunConfig, data: PreparedData):
    return create_method(cfg.method.name, data.spec, cfg.method.params, cfg.optim, cfg.train.max_epochs,
                         data.sets["train"].class_counts())


def _stage_trainer_factory(cfg: RunConfig):
    def make(stage_dir: Path, max_epochs: int, monitor: str | None = None, mode: str | None = None):
        return build_trainer(cfg.train, stage_dir, max_epochs=max_epochs, monitor=monitor, mode=mode)
    return make


def _add_stage_seconds(run_dir: Path, seconds: float) -> float:
    """The stages' wall time summed over the run's processes: one resumed after its stages finished
    reloads their weights in about 0 s, and a per-process clock would forget the training."""
    path = run_dir / "stages" / "seconds.json"
    if not path.parent.is_dir():
        return seconds
    total = seconds + (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0)
    if not is_ddp_child():
        atomic_write_json(path, {"seconds": total})
    return total


def _fit(cfg: RunConfig, data: PreparedData, run_dir: Path, resume: bool):
    """Stages, then the main fit; returns the method with its best (validation-chosen) weights."""
    method = _build_method(cfg, data)
    dm = make_datamodule(cfg, data, getattr(method.params, "balanced_sampler", False))
    started = time.perf_counter()
    method.fit_stages(StageContext(dm, run_dir, _stage_trainer_factory(cfg), resume))
    stage_seconds = _add_stage_seconds(run_dir, time.perf_counter() - started)
    trainer = build_trainer(cfg.train, run_dir)
    last = run_dir / CKPT_DIR / "last.ckpt"
    if resume and not last.is_file():
        log.warning("no last checkpoint in %s yet: starting the main fit from scratch", run_dir)
    trainer.fit(method, datamodule=dm, ckpt_path=last if resume and last.is_file() else None, weights_only=True)
    clock = training_clock(trainer)
    seconds = clock.seconds
    if not trainer.is_global_zero:
        return None, None
    best = run_dir / CKPT_DIR / "best.ckpt"
    method.load_state_dict(best_checkpoint_state(best if best.is_file() else last))
    cost = {"train_seconds": seconds, "stage_seconds": stage_seconds, "epochs": trainer.current_epoch,
            "train_images_per_second": clock.images / max(seconds, 1e-9), "peak_memory_mb": peak_memory_mb()}
    return method, cost


def _self_train(cfg: RunConfig, data: PreparedData, run_dir: Path, resume: bool) -> PreparedData:
    """U-SelfTrained: train with uncertain entries ignored, relabel them with the model's probabilities."""
    from diffmed.data.labels import relabel_uncertain
    from diffmed.methods.losses import probabilities

    stage_dir = run_dir / "stages" / "selftrain"
    stage_dir.mkdir(parents=True, exist_ok=True)
    method, _ = _fit(cfg, data, stage_dir, resume and (stage_dir / CKPT_DIR / "last.ckpt").is_file())
    if method is None:
        return data
    dm = make_datamodule(cfg, data)
    out = collect_outputs(method, dm.eval_loader("train"))
    probs = probabilities(torch.from_numpy(out.logits), data.spec).numpy()
    data.sets["train"] = relabel_uncertain(data.sets["train"], data.raw_train_targets, probs, data.uncertain_columns)
    return data


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Path | None:
    """Train ``cfg`` into ``run_dir`` (or continue it); returns the run folder (None on DDP child ranks)."""
    if cfg is not None:
        method_params(cfg.method.name, cfg.method.params)  # fail on a bad method before any work
    run_dir = open_run_dir(run_dir, resume)
    if resume or is_ddp_child():
        cfg = load_config(run_dir / CONFIG_FILE)
    else:
        save_config(cfg, run_dir / CONFIG_FILE)
    seed_all(cfg.train.seed)
    data = prepare_data(cfg, run_dir)
    if data.uncertain_columns:
        data = _self_train(cfg, data, run_dir, resume)
    method, cost = _fit(cfg, data, run_dir, resume)
    if method is None:
        return None
    finalize(cfg, data, method, run_dir, cost)
    return run_dir


def model_meta(cfg: RunConfig, method, data: PreparedData, calibration: dict) -> dict:
    """The input contract and everything ``predict`` needs to rebuild the model and its preprocessing, and the
    training images per class (real and synthetic: a benchmark checks a kept run's synthetic share by them)."""
    return {"method": cfg.method.name, "params": method.params.model_dump(mode="json"), "optim": cfg.optim.model_dump(),
            "max_epochs": cfg.train.max_epochs, **data.spec.to_dict(), **calibration, "dataset": cfg.data.source,
            "seed": cfg.train.seed, "train_counts": data.sets["train"].real_and_synthetic_counts()}


def finalize(cfg: RunConfig, data: PreparedData, method, run_dir: Path, cost: dict | None) -> dict:
    """Calibrate on validation, export the model, evaluate on test, write metrics, predictions and report."""
    dm = make_datamodule(cfg, data)
    val = evaluate_split(method, dm.eval_loader("val"), data.spec)
    calibration = {"temperature": val["temperature"], "thresholds": val["thresholds"]}
    export_model(method, run_dir, model_meta(cfg, method, data, calibration))
    test_out = collect_outputs(method, dm.eval_loader("test"))
    cost = dict(cost or {})
    cost.update(infer_seconds_per_image=test_out.seconds_per_image,
                forward_passes_per_image=method.forward_passes_per_image())
    _pictures(method, dm, data.spec, run_dir)
    return write_test_results(run_dir, cfg, data.spec, data.sets["test"], test_out, val, cost)


def _pictures(method, dm, spec: TaskSpec, run_dir: Path, n: int = 6) -> None:
    """Pictures of the first test images: Grad-CAM for CNN methods, plus each method's own (single-label)."""
    from diffmed.report.gradcam import plot_gradcam

    if spec.multilabel:
        return
    batch = next(iter(dm.eval_loader("test")))
    images = batch["image"][:n].to(next(method.parameters()).device)
    targets = batch["target"][:n].tolist()
    plot_gradcam(method, images, targets, spec.class_names, run_dir / "plots" / "gradcam.png")
    method.plot_extras(images, targets, run_dir / "plots")


def load_trained(run_dir: Path, device: torch.device | None = None):
    """The trained method of a run folder, weights loaded from safetensors, in eval mode."""
    meta = read_model_meta(run_dir)
    cfg = load_config(Path(run_dir) / CONFIG_FILE)
    spec = TaskSpec.from_dict(meta)
    params = saved_method_params(meta["method"], meta["params"])
    method = create_method(meta["method"], spec, params, cfg.optim, meta["max_epochs"], None)
    missing, unexpected = method.load_state_dict(load_state(run_dir), strict=False)
    if unexpected or [k for k in missing if not k.endswith("class_weights")]:
        raise RunError(f"weights in '{run_dir}/model' do not match method '{meta['method']}' "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    method.to(device or torch.device("cpu")).eval()
    return method, meta, cfg


def evaluate(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Re-evaluate a trained run on its test split, or on other data given by ``data.*`` overrides."""
    from diffmed.engine.inference import pick_device

    method, meta, cfg = load_trained(run_dir)
    method.to(pick_device(cfg.train.accelerator))
    if overrides:
        cfg = load_config(Path(run_dir) / CONFIG_FILE, overrides=overrides)
    seed_all(cfg.train.seed)
    out_dir = Path(run_dir) if not overrides else Path(run_dir) / "evaluations" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out_dir if overrides else Path(run_dir))
    dm = make_datamodule(cfg, data)
    test_out = collect_outputs(method, dm.eval_loader("test"))
    val = {"temperature": meta["temperature"], "thresholds": meta["thresholds"], "metrics": {}}
    cost = {"infer_seconds_per_image": test_out.seconds_per_image,
            "forward_passes_per_image": method.forward_passes_per_image()}
    if overrides:  # the evaluation folder carries the model's contract so its report can be read alone
        save_config(cfg, out_dir / CONFIG_FILE)
        atomic_write_json(out_dir / "model" / "model.json", meta)
    return write_test_results(out_dir, cfg, data.spec, data.sets["test"], test_out, val, cost)
