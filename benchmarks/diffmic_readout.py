"""DiffMIC-v2's readout on the same trained weights: how a denoised label vector y_0 becomes probabilities.

``clamped`` (the paper's) clamps y_0 at a floor and renormalises, so a class below the floor is ranked by the other
classes' total, not by its own score; ``logits`` reads y_0 as logits (``method.params.readout``). Both keep the
argmax, so they differ in AUC and calibration. For every finished DiffMIC-v2 run given (its weights in
``model/``), each readout gets its own validation temperature and is scored on the run's test split; the two are
compared on the same test images (paired bootstrap, logits minus clamped). Each readout's evaluation is written
to ``<run>/readouts/<readout>/``; the table to ``--out``/``--name``.{json,md}.

    python benchmarks/diffmic_readout.py \
        benchmarks/work/benchmark-full/retinamnist/variants/readout-logits/runs/diffmic_v2-s[012] \
        benchmarks/work/benchmark-full/ham10000/variants/dcg-features/runs/diffmic_v2-s[12]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from diffmed.bench import markdown_table, weighted_run, write_results
from diffmed.engine.checkpoint import atomic_write_json
from diffmed.engine.data import make_datamodule
from diffmed.engine.evaluate import evaluate_split, write_test_results
from diffmed.engine.inference import collect_outputs
from diffmed.evaluation.compare import compare_runs

READOUTS = ("clamped", "logits")
METRICS = ("acc", "f1_macro", "auc", "ece")
PAIRED = ("auc", "f1_macro")


def evaluate_readout(trained: tuple, run_dir: Path, readout: str) -> tuple[Path, dict]:
    """Calibrate ``readout`` on the run's validation split, score it on test; (evaluation folder, metrics)."""
    method, meta, cfg, data = trained
    method.params.readout = readout
    dm = make_datamodule(cfg, data)
    val = evaluate_split(method, dm.eval_loader("val"), data.spec)
    test = collect_outputs(method, dm.eval_loader("test"))
    out_dir = run_dir / "readouts" / readout
    atomic_write_json(out_dir / "model" / "model.json",
                      {**meta, "params": method.params.model_dump(mode="json"), "temperature": val["temperature"],
                       "thresholds": val["thresholds"]})
    cost = {"infer_seconds_per_image": test.seconds_per_image}
    return out_dir, write_test_results(out_dir, cfg, data.spec, data.sets["test"], test, val, cost)


def variant_tag(run_dir: Path) -> str:
    """The variant a run of ``benchmarks/variant.py`` belongs to (``.../variants/<tag>/runs/<run>``), else its name."""
    parts = run_dir.resolve().parts
    return parts[-3] if len(parts) > 3 and parts[-4] == "variants" else run_dir.name


def compare(run_dir: Path, n_boot: int) -> dict:
    trained = weighted_run(run_dir, "the readout comparison")
    if trained[1]["method"] != "diffmic_v2":
        raise SystemExit(f"{run_dir} is a '{trained[1]['method']}' run; this benchmark reads DiffMIC-v2 runs")
    folders, results = {}, {}
    for readout in READOUTS:
        folders[readout], results[readout] = evaluate_readout(trained, run_dir, readout)
    diff = compare_runs(folders["logits"], folders["clamped"], metrics=PAIRED, n_boot=n_boot)
    diff.pop("markdown")
    first = results["clamped"]
    return {"run": "/".join(run_dir.resolve().parts[-5:]), "dataset": Path(first["dataset"]).stem,
            "seed": first["seed"], "tag": variant_tag(run_dir),
            "readouts": {r: {"val": res["val"], "test": res["test"], "temperature": res["temperature"]}
                         for r, res in results.items()},
            "logits_minus_clamped": diff["metrics"]}


def table(runs: list[dict]) -> str:
    header = ["run", "readout", *(f"val {m}" for m in ("auc", "f1_macro")), *(f"test {m}" for m in METRICS),
              "temperature", "test diff logits - clamped"]
    rows = []
    for r in runs:
        d = r["logits_minus_clamped"]
        diff = "; ".join(f"{m} {d[m]['diff']:+.3f} (p={d[m]['p_value']:.3f})" for m in PAIRED)
        for readout, res in r["readouts"].items():
            rows.append([f"{r['dataset']} s{r['seed']} ({r['tag']})" if readout == READOUTS[0] else "", readout,
                         *(f"{res['val'][m]:.3f}" for m in ("auc", "f1_macro")),
                         *(f"{res['test'][m]:.3f}" for m in METRICS), f"{res['temperature']:.3g}",
                         diff if readout == "logits" else ""])
    return markdown_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="finished DiffMIC-v2 run folders with their weights")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffmic")
    ap.add_argument("--name", default="readout")
    args = ap.parse_args()
    runs = [compare(run, args.n_boot) for run in args.runs]
    md = ("Same weights, two readouts; each readout's temperature is fitted on validation. Runs: "
          + ", ".join(r["run"] for r in runs) + ".\n\n" + table(runs))
    write_results(args.out, args.name, {"runs": runs}, md)
    print(md)


if __name__ == "__main__":
    main()
