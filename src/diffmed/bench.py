"""Benchmark plumbing shared by the scripts under ``benchmarks/`` and ``diffmed benchmark``.

A benchmark is a grid of runs (method x dataset x seed), each an ordinary run folder trained by the
engine. Finished runs (``metrics.json`` present) are read back, killed ones resumed, missing ones
started, so rerunning a killed benchmark redoes nothing and gives the same table. A finished run's record
(what a report reads of it, a few files) is kept beside the committed results and put back into an empty work
folder, so a benchmark carries across machines and sessions without its checkpoints.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from diffmed.config import RunConfig, config_changes, load_config
from diffmed.engine.checkpoint import atomic_write_bytes, atomic_write_json
from diffmed.engine.evaluate import HEADLINE
from diffmed.engine.data import PreparedData, prepare_data
from diffmed.engine.run import CONFIG_FILE, load_trained, train
from diffmed.errors import RunError

log = logging.getLogger("diffmed.bench")
HAM10000 = ["data.label_columns=[dx]", "data.group_column=lesion_id", "data.image_size=64"]


def dataset_overrides(name: str, data_dir: Path) -> list[str]:
    """Config overrides for the project's standing datasets (file name or ``ham10000``)."""
    if name.startswith("ham10000"):
        return [f"data.source={data_dir / 'ham10000_subset'}", *HAM10000]
    return [f"data.source={data_dir / (name if name.endswith('.npz') else name + '.npz')}"]


@contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN.lock`` beside ``run_dir``: a second process asking for the same run waits, then reads it."""
    lock = run_dir.with_name(run_dir.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
        yield


def run_or_resume(cfg: RunConfig | list[str], run_dir: Path) -> dict:
    """Metrics of the run in ``run_dir``: read if finished, resumed if killed, trained otherwise.

    Safe across processes: two benchmark processes that need the same run never train it twice.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    if isinstance(cfg, list):
        cfg = load_config(None, overrides=cfg)
    with exclusive(run_dir):
        check_same_settings(run_dir, cfg)
        if not metrics.is_file():
            resume = (run_dir / CONFIG_FILE).is_file()
            log.warning("%s %s", "resuming" if resume else "training", run_dir)
            os.environ.pop("DIFFMED_RUN_DIR", None)
            train(cfg, run_dir, resume=resume)
    return json.loads(metrics.read_text())


def check_same_settings(run_dir: Path, cfg: RunConfig | None, generator_params: dict | None = None,
                        synthetic_counts: dict[str, int] | None = None) -> None:
    """A run folder (or record) left by other settings is an error, never silently read back as this run;
    ``generator_params``: it holds a generator, trained with these options; ``synthetic_counts``: it holds
    synthetic images (or a run trained on them), this many per class."""
    from diffmed.diffusion.generative import generator_param_changes

    saved = run_dir / CONFIG_FILE
    changes = config_changes(load_config(saved), cfg) if cfg is not None and saved.is_file() else []
    if generator_params is not None:
        changes += generator_param_changes(run_dir, generator_params)
    if synthetic_counts is not None:
        changes += synthetic_count_changes(run_dir, synthetic_counts)
    if changes:
        raise RunError(f"'{run_dir}' holds a run with other settings than this benchmark asks for "
                       f"({'; '.join(changes)}); delete that folder (and its record, if one was restored from "
                       "committed results) to train it again, or write this benchmark to another folder")


def synthetic_count_changes(folder: Path, planned: dict[str, int]) -> list[str]:
    """The synthetic images per class a generation folder (``generation.json``) or a run trained on them
    (``model/model.json``) holds, against ``planned``; a run kept before runs recorded them shows no change."""
    from diffmed.diffusion.generate import STATE_FILE

    state, meta = folder / STATE_FILE, folder / "model" / "model.json"
    if state.is_file():
        held = json.loads(state.read_text()).get("counts")
    else:
        held = json.loads(meta.read_text()).get("train_counts", {}).get("synthetic") if meta.is_file() else None
    return [] if held in (None, planned) else [f"synthetic images per class: {held} -> {planned}"]


def trained_run(run_dir: Path) -> tuple:
    """(method in eval mode, model metadata, config, prepared data with the run's own splits) of a finished run."""
    method, meta, cfg = load_trained(run_dir)
    os.environ.pop("DIFFMED_RUN_DIR", None)  # as before training: no earlier run's folder leaks into later runs
    data: PreparedData = prepare_data(cfg, run_dir)
    return method, meta, cfg, data


def weighted_run(run_dir: Path, needs: str, fix: str = "train it again") -> tuple:
    """``trained_run``, or a clear stop where the folder holds a record (which keeps no weights) but no weights."""
    if not (run_dir / "model" / "model.safetensors").is_file():
        raise SystemExit(f"{run_dir} holds a record without the weights that {needs} reads: {fix}")
    return trained_run(run_dir)


def add_location_args(ap: argparse.ArgumentParser, script: str, results: str, work: str | None = None) -> None:
    """``--data-dir`` (``shared/data`` beside the checkout), ``--out`` (``benchmarks/results/<results>``) and
    ``--work`` (``benchmarks/work/<work>``, default ``<results>``) of the benchmark script ``script``."""
    here = Path(script).resolve().parent
    ap.add_argument("--data-dir", type=Path, default=here.parents[1] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=here / "results" / results)
    ap.add_argument("--work", type=Path, default=here / "work" / (work or results))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=float)
    return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: list[dict], metrics: Iterable[str] = HEADLINE) -> dict:
    """Mean, std over seeds and per-seed 95% CIs of each test metric, plus mean cost."""
    out: dict = {"n_seeds": len(runs)}
    for m in metrics:
        mean, std = mean_std(r["test"][m] for r in runs)
        out[m] = {"mean": mean, "std": std, "ci": [[r["test_ci"][m]["low"], r["test_ci"][m]["high"]]
                                                   for r in runs if m in r.get("test_ci", {})]}
    costs = [r.get("cost", {}) for r in runs]
    out["cost"] = {k: mean_std(c[k] for c in costs if k in c)[0] for k in costs[0]} if costs else {}
    return out


def fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def settings_of(args: argparse.Namespace) -> dict:
    """A benchmark's parsed arguments as JSON values (paths as text), saved beside its results."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} while the file does not exist (a cache or record not written yet)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(out_dir: Path, name: str, results: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json", results)
    atomic_write_bytes(out_dir / f"{name}.md", markdown.encode())


def per_seed_ci(s: dict, metric: str) -> str:
    """The per-seed bootstrap CIs of a ``summarize`` entry, as text."""
    return "; ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in s[metric]["ci"])


def cost_ratio(s: dict, base: dict, key: str) -> str:
    """A cost of ``s`` and its ratio to the baseline's."""
    value, ref = s["cost"].get(key), base["cost"].get(key)
    if value is None or not ref:
        return "n/a"
    return f"{value:.3g} ({value / ref:.1f}x)"


def paired(dirs_a: list[Path], dirs_b: list[Path], metrics: Iterable[str], n_boot: int) -> list[dict]:
    """Paired bootstrap (and McNemar) of A minus B per seed, on the seed's shared test split."""
    from diffmed.evaluation.compare import compare_runs

    out = []
    for i, (a, b) in enumerate(zip(dirs_a, dirs_b)):
        res = compare_runs(a, b, metrics=tuple(metrics), n_boot=n_boot, seed=i)
        res.pop("markdown")
        out.append(res)
    return out


def pvalue_cells(comparisons: list[dict], metrics: Iterable[str]) -> list[str]:
    """Per metric: each seed's difference and p-value."""
    return ["; ".join(f"{c['metrics'][m]['diff']:+.3f} (p={c['metrics'][m]['p_value']:.3f})" for c in comparisons)
            for m in metrics]


def save_configs(run_dirs: Iterable[Path], out_dir: Path) -> None:
    """Keep each run's resolved config beside the results (the run folders themselves are not committed)."""
    dest = out_dir / "configs"
    dest.mkdir(parents=True, exist_ok=True)
    for run_dir in map(Path, run_dirs):
        atomic_write_bytes(dest / f"{run_dir.name}.yaml", (run_dir / CONFIG_FILE).read_bytes())


RUN_RECORD = ("config.yaml", "metrics.json", "predictions.csv", "model/model.json")
"""What every report reads of a finished run (``metrics.json`` present): no weights."""
GENERATOR_DONE = "generator/model.json"
GENERATOR_RECORD = ("config.yaml", GENERATOR_DONE, "generator/model.safetensors", "splits.json")
"""A generator keeps its exported weights (the runs still to train read them, and training it again costs hours)
and its split, by which D-Cube checks that the generator never saw the run's validation or test images."""
FINISHED = ".finished"
"""Written last into a record: a record without it was cut short and is copied again."""


def record_complete(record: Path, done: str) -> bool:
    return (record / FINISHED).is_file() and (record / done).is_file()


def keep_record(run_dir: Path, record: Path, patterns: Iterable[str], done: str) -> None:
    """Copy the files of a finished ``run_dir`` (``done`` present) matching ``patterns`` to ``record``. A complete
    record is never overwritten; it only gains the files it lacks (a table derived from the run later)."""
    if not (run_dir / done).is_file():
        return
    complete = record_complete(record, done)
    for pattern in patterns:
        for f in run_dir.glob(pattern):
            kept = record / f.relative_to(run_dir)
            if not (complete and kept.is_file()):
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, kept)
    if not complete:
        (record / FINISHED).write_text(f"{done}\n")


def restore_record(record: Path, run_dir: Path, done: str) -> bool:
    """Put a complete record back where its run is read (unless that run has finished there); True if it did."""
    if (run_dir / done).is_file() or not record_complete(record, done):
        return False
    shutil.copytree(record, run_dir, dirs_exist_ok=True)
    return True


def restore_records(records: Path, work: Path, pattern: str, done: str | Callable[[Path], str]) -> None:
    """Put each complete record matching ``pattern`` under ``records`` back at the same place under ``work``;
    ``done`` names the file that marks it finished (or tells it from the record)."""
    for record in sorted(p for p in records.glob(pattern) if p.is_dir()):
        restore_record(record, work / record.relative_to(records), done(record) if callable(done) else done)
