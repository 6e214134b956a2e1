"""``diffmed benchmark``: every method on one dataset, same splits, several seeds, one report."""
from __future__ import annotations

from pathlib import Path

from diffmed.benchmark.arms import ARMS, BUDGETS, check_finished_runs, parse_method_params, parse_methods, plan_jobs
from diffmed.benchmark.report import collect, write_benchmark_report
from diffmed.benchmark.runner import run_jobs
from diffmed.errors import ConfigError


def data_overrides(data: str, extra: list[str]) -> list[str]:
    """The dataset as config overrides; a HAM10000-style folder gets its label and lesion columns."""
    from diffmed.bench import HAM10000

    base = [f"data.source={data}"]
    if Path(data).is_dir() and (Path(data) / "labels.csv").is_file() and "ham10000" in Path(data).name:
        base += HAM10000
    return base + list(extra)


def run_benchmark(data: str, out: Path, methods: str = "all", seeds: int | None = None, budget: str = "quick",
                  workers: int = 1, gpus: int = 0, overrides: list[str] = (),
                  balance_to: float | None = None, method_params: list[str] = ()) -> tuple[Path, Path]:
    """Run (or resume) the benchmark and write ``benchmark.json``, ``benchmark.md`` and ``benchmark.html``.

    ``method_params``: ``METHOD.PARAM=VALUE`` settings of one method on top of the budget's."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown --budget '{budget}'; choose {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    names = parse_methods(methods)
    plan = plan_jobs(names, data_overrides(data, overrides), list(range(seeds or b.seeds)), b, Path(out), balance_to,
                     parse_method_params(list(method_params)))
    check_finished_runs(plan["jobs"])
    run_jobs(plan["jobs"], workers=workers, gpus=gpus)
    _, md, html = write_report(Path(out), plan["runs"], budget, names)
    return md, html


def write_report(out: Path, runs: dict[str, list[Path]], budget: str, names: list[str],
                 extra: dict | None = None) -> tuple[dict, Path, Path]:
    """``benchmark.json``, ``.md`` and ``.html`` of finished runs ({method: run folders by seed}) under ``out``;
    ``extra`` adds keys to ``benchmark.json``."""
    result = collect(runs, n_boot=1000)
    result["budget"], result["methods_run"] = budget, names
    result.update(extra or {})
    md, html = write_benchmark_report(out, runs, result, {m: ARMS[m].about for m in names})
    return result, md, html


__all__ = ["run_benchmark", "write_report", "ARMS", "BUDGETS"]
