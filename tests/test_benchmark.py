"""`diffmed benchmark`: a killed benchmark rerun redoes nothing finished and ends with the same table."""
from __future__ import annotations

import json
import re

import pytest

from conftest import load_benchmark, run_killed
from diffmed.benchmark import BUDGETS, run_benchmark
from diffmed.benchmark.arms import parse_method_params, parse_methods, plan_jobs
from diffmed.benchmark.runner import pending_jobs
from diffmed.errors import ConfigError

SMALL = ["train.batch_size=32", "eval.bootstrap=50"]


def _results(root):
    """Every statistic of the table; cost (wall-clock timings) naturally differs between runs."""
    methods = json.loads((root / "benchmark.json").read_text())["methods"]
    return {m: {k: v for k, v in e.items() if k != "cost"} for m, e in methods.items()}


@pytest.mark.slow
def test_killed_benchmark_resumes_to_the_uninterrupted_table(tmp_path, tiny_pneumonia):
    methods = "baseline,class_weighted"
    run_benchmark(str(tiny_pneumonia), tmp_path / "straight", methods, overrides=SMALL)

    killed = tmp_path / "killed"
    body = (f"from diffmed.benchmark import run_benchmark\n"
            f"run_benchmark({str(tiny_pneumonia)!r}, __import__('pathlib').Path({str(killed)!r}), {methods!r}, "
            f"overrides={SMALL!r})")
    proc = run_killed(body, kill_epoch=0, only="class_weighted")
    assert proc.returncode == -9, proc.stderr[-2000:]
    finished = killed / "runs" / "baseline-s0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    assert not (killed / "runs" / "class_weighted-s0" / "metrics.json").exists()

    md, html = run_benchmark(str(tiny_pneumonia), killed, methods, overrides=SMALL)
    assert finished.stat().st_mtime_ns == stamp  # the finished run was not redone
    assert _results(killed) == _results(tmp_path / "straight")
    page = html.read_text()
    for section in ("methods", "results", "significance", "cost", "roc", "confusion", "reliability",
                    "per-class-recall", "diffusion"):
        assert f'<section id="{section}">' in page

    # benchmarks/full.py commits a benchmark's report from the seeds on which every method has finished
    full, names = load_benchmark("full"), parse_methods(methods)
    plan = plan_jobs(names, [], [0], BUDGETS["full"], killed)
    result = full.report(plan, killed, tmp_path / "results", names)
    assert _results(tmp_path / "results" / "killed") == _results(tmp_path / "straight")
    assert "| class_weighted | " in full.table({"pneumoniamnist": result})
    # the committed records (no weights) carry the benchmark to a new machine: nothing is retrained there
    record = tmp_path / "results" / "killed" / "runs" / "class_weighted-s0"
    assert (record / "config.yaml").is_file() and not list(record.glob("**/*.safetensors"))
    moved = tmp_path / "moved" / "killed"
    moved_plan = plan_jobs(names, [], [0], BUDGETS["full"], moved)
    full.restore_records(moved_plan, tmp_path / "results" / "killed")
    assert not pending_jobs(moved_plan["jobs"])
    full.report(moved_plan, moved, tmp_path / "moved_results", names)
    assert _results(tmp_path / "moved_results" / "killed") == _results(tmp_path / "straight")
    committed = tmp_path / "moved_results" / "killed"
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (committed / "benchmark.md").read_text())
    assert links and all((committed / link).is_file() for link in links)  # the committed report's pictures are kept
    # before a seed has every method, the finished ones are reported as partial (always with the baseline)
    (killed / "runs" / "class_weighted-s0" / "metrics.json").unlink()
    partial = full.report(plan, killed, tmp_path / "partial", names)
    assert list(partial["methods"]) == ["baseline"] and partial["missing"] == ["class_weighted"]
    assert "Partial: " in full.table({"pneumoniamnist": partial})
    (killed / "runs" / "baseline-s0" / "metrics.json").unlink()
    assert full.report(plan, killed, tmp_path / "none", names) is None


def test_method_list_is_checked_and_always_has_the_baseline():
    assert parse_methods("class_weighted")[0] == "baseline"
    with pytest.raises(ConfigError, match="dcube"):
        parse_methods("dcub")


def test_a_run_held_by_one_process_waits_for_it_in_another(tmp_path):
    """Two benchmark processes needing the same run: the second enters only after the first is done."""
    import threading
    import time

    from diffmed.bench import exclusive

    order = []

    def second():
        with exclusive(tmp_path / "run"):
            order.append("second")

    with exclusive(tmp_path / "run"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]


def test_stages_start_first_and_are_skipped_once_their_dependents_have_finished(tmp_path):
    from pathlib import Path

    from diffmed.benchmark.runner import Job, run_jobs

    def job(name, *after):  # "finished" once its folder exists
        return Job(name, Path.mkdir, (tmp_path / name,), tmp_path / name, done=".", after=list(after))

    jobs = [job("baseline"), job("generator"), job("dcube", "generator"), job("synthetic", "generator"),
            job("rebalance", "synthetic"), job("traditional")]
    # the longest chain's head first, then the arms that use a stage
    assert [j.name for j in pending_jobs(jobs)] == ["generator", "synthetic", "dcube", "rebalance", "baseline",
                                                    "traditional"]
    (tmp_path / "dcube").mkdir()
    (tmp_path / "rebalance").mkdir()  # say, restored from committed records
    assert [j.name for j in pending_jobs(jobs)] == ["baseline", "traditional"]
    run_jobs(jobs, workers=2)
    assert (tmp_path / "baseline").is_dir() and (tmp_path / "traditional").is_dir()
    assert not (tmp_path / "generator").exists()  # no generator trained for arms that are done
    (tmp_path / "rebalance").rmdir()
    run_jobs(jobs, workers=1)
    assert (tmp_path / "generator").is_dir() and (tmp_path / "synthetic").is_dir() and (tmp_path / "rebalance").is_dir()


def test_full_benchmark_methods_pick_the_runs_to_train_and_the_stages_they_need(tmp_path):
    full = load_benchmark("full")
    plan = plan_jobs(parse_methods("all"), [], [0, 1], BUDGETS["full"], tmp_path)
    names = lambda methods: sorted(j.name for j in full.selected_jobs(plan, parse_methods(methods)))  # noqa: E731
    assert names("baseline") == ["baseline-s0", "baseline-s1"]
    assert names("dcube") == ["baseline-s0", "baseline-s1", "dcube-s0", "dcube-s1", "generator-s0", "generator-s1"]
    assert "synthetic-s1" in names("diffusion_rebalance") and "synthetic-s0" not in names("dcube")


def test_a_finished_run_left_by_other_settings_is_an_error_not_read_back(tmp_path):
    from diffmed.benchmark.arms import check_finished_runs
    from diffmed.config import load_config, save_config
    from diffmed.errors import RunError

    def plan(root, source):
        return plan_jobs(["baseline"], [f"data.source={source}"], [0], BUDGETS["full"], root)

    planned = plan(tmp_path / "here", "/here/data/x.npz")
    run = tmp_path / "here" / "runs" / "baseline-s0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    moved = plan(tmp_path / "there", "/there/data/x.npz")["jobs"][0].args[0]  # the same run, on another machine
    save_config(load_config(None, moved), run / "config.yaml")
    check_finished_runs(planned["jobs"])
    save_config(load_config(None, [*moved, "train.max_epochs=2"]), run / "config.yaml")
    with pytest.raises(RunError, match=r"baseline-s0.*train.max_epochs: 2 -> 8"):
        check_finished_runs(planned["jobs"])


def test_a_finished_generator_trained_with_other_options_is_an_error(tmp_path):
    from diffmed.benchmark.arms import check_finished_runs
    from diffmed.config import load_config, save_config
    from diffmed.diffusion.generative import parse_params
    from diffmed.errors import RunError

    jobs = plan_jobs(["dcube"], ["data.source=/here/data/x.npz"], [0], BUDGETS["full"], tmp_path)["jobs"]
    gen = next(j for j in jobs if j.name == "generator-s0")
    (gen.out / "generator").mkdir(parents=True)
    (gen.out / "generator" / "model.safetensors").write_bytes(b"weights")
    save_config(load_config(None, gen.args[0]), gen.out / "config.yaml")
    trained = parse_params({**BUDGETS["full"].generator, "sample_every_n_epochs": 3}).model_dump()  # grids only
    (gen.out / "generator" / "model.json").write_text(json.dumps({"params": trained}))
    check_finished_runs(jobs)
    (gen.out / "generator" / "model.json").write_text(json.dumps({"params": {**trained, "lr": 1e-3}}))
    with pytest.raises(RunError, match=r"generator-s0.*generator lr: 0.001 -> 0.0005"):
        check_finished_runs(jobs)


def test_synthetic_images_or_a_run_made_with_another_share_are_an_error(tmp_path):
    from diffmed.benchmark.arms import check_finished_runs
    from diffmed.config import load_config, save_config
    from diffmed.diffusion.generative import parse_params
    from diffmed.errors import RunError

    plan = plan_jobs(["diffusion_rebalance"], ["data.source=/here/data/x.npz"], [0], BUDGETS["full"], tmp_path, 0.5)
    jobs = {j.name: j for j in plan["jobs"]}
    files = {  # a finished generator (10 normal, 30 pneumonia images), its synthetic images and a run on them
        "stages/generator-s0/generator/model.json": {"params": parse_params(BUDGETS["full"].generator).model_dump(),
                                                     "spec": {"class_names": ["normal", "pneumonia"]},
                                                     "class_counts": {"normal": 10, "pneumonia": 30}},
        "stages/generator-s0/generator/model.safetensors": {}, "stages/synthetic-s0/.complete": {},
        "stages/synthetic-s0/generation.json": {"counts": {"normal": 5, "pneumonia": 0}},  # fills to 0.5 x 30
        "runs/diffusion_rebalance-s0/metrics.json": {},
        "runs/diffusion_rebalance-s0/model/model.json": {"train_counts": {"synthetic": {"normal": 5, "pneumonia": 0}}},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    for name in ("generator-s0", "diffusion_rebalance-s0"):
        save_config(load_config(None, jobs[name].args[0]), jobs[name].out / "config.yaml")
    check_finished_runs(plan["jobs"])
    run_meta = tmp_path / "runs/diffusion_rebalance-s0/model/model.json"
    run_meta.write_text(json.dumps({"train_counts": {"synthetic": {"normal": 20, "pneumonia": 0}}}))  # share 1.0
    with pytest.raises(RunError, match=re.escape("diffusion_rebalance-s0' holds a run with other settings than this "
                                                 "benchmark asks for (synthetic images per class: {'normal': 20, "
                                                 "'pneumonia': 0} -> {'normal': 5, 'pneumonia': 0})")):
        check_finished_runs(plan["jobs"])
    run_meta.write_text("{}")  # kept before runs recorded their training images: nothing to compare
    check_finished_runs(plan["jobs"])
    (tmp_path / "stages/synthetic-s0/generation.json").write_text(json.dumps({"counts": {"normal": 20,
                                                                                         "pneumonia": 0}}))
    with pytest.raises(RunError, match=r"synthetic-s0.*synthetic images per class"):
        check_finished_runs(plan["jobs"])


def test_a_generator_record_keeps_its_weights_so_dcube_needs_no_new_generator(tmp_path):
    full = load_benchmark("full")
    plan = plan_jobs(parse_methods("dcube"), [], [0], BUDGETS["full"], tmp_path / "work")
    generator = next(j for j in plan["jobs"] if j.name == "generator-s0")
    for name, text in [("config.yaml", "seed: 0\n"), ("generator/model.json", "{}"),
                       ("generator/model.safetensors", "weights"), ("logs/samples/epoch_0020.png", "png"),
                       ("last.ckpt", "optimiser state")]:
        (generator.out / name).parent.mkdir(parents=True, exist_ok=True)
        (generator.out / name).write_text(text)
    full.keep_records(plan, tmp_path / "records")
    record = tmp_path / "records" / "stages" / "generator-s0"
    assert sorted(str(f.relative_to(record)) for f in record.rglob("*") if f.is_file()) == [
        ".finished", "config.yaml", "generator/model.json", "generator/model.safetensors",
        "logs/samples/epoch_0020.png"]
    moved = plan_jobs(parse_methods("dcube"), [], [0], BUDGETS["full"], tmp_path / "moved")
    full.restore_records(moved, tmp_path / "records")
    assert [j.name for j in pending_jobs(moved["jobs"])] == ["dcube-s0", "baseline-s0"]


def test_diffusion_rebalancing_is_tested_against_traditional_augmentation(tmp_path):
    """On the committed full-benchmark records: the pair's paired test is A - B of the same runs' means."""
    from pathlib import Path

    from diffmed.benchmark.report import collect, write_benchmark_report

    records = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist" / "runs"
    names = ("baseline", "traditional_rebalance", "diffusion_rebalance")
    runs = {m: [records / f"{m}-s{s}" for s in (0, 1)] for m in names}
    if not all((d / "predictions.csv").is_file() for dirs in runs.values() for d in dirs):
        pytest.skip("the committed PneumoniaMNIST full-benchmark records are not in this checkout")
    result = collect(runs, n_boot=200)
    test = result["contrasts"]["diffusion_rebalance vs traditional_rebalance"]
    means = {m: result["methods"][m]["metrics"]["f1_macro"]["mean"] for m in names}
    assert test["f1_macro"]["diff"] == pytest.approx(means["diffusion_rebalance"] - means["traditional_rebalance"])
    assert 0 < test["f1_macro"]["p_value"] <= 1 and len(test["mcnemar_p"]) == 2
    md, _ = write_benchmark_report(tmp_path, runs, result, {})
    assert "| diffusion_rebalance vs traditional_rebalance | " in md.read_text()
    # without one of the pair there is nothing to contrast
    assert collect({m: runs[m] for m in names[:2]}, n_boot=50)["contrasts"] == {}


def test_an_ordinal_benchmark_reports_the_quadratic_kappa_of_each_run(tmp_path):
    """On the committed RetinaMNIST records (ordinal grades): the column is the seed mean of sklearn's value."""
    from pathlib import Path

    from sklearn.metrics import cohen_kappa_score

    from diffmed.benchmark.report import collect, write_benchmark_report
    from diffmed.evaluation.compare import load_predictions

    records = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "retinamnist" / "runs"
    runs = {m: [records / f"{m}-s{s}" for s in (0, 1)] for m in ("baseline", "class_weighted")}
    if not all((d / "predictions.csv").is_file() for dirs in runs.values() for d in dirs):
        pytest.skip("the committed RetinaMNIST full-benchmark records are not in this checkout")
    result = collect(runs, n_boot=50)
    by_seed = [cohen_kappa_score(p.y_true, p.pred, weights="quadratic")
               for p in map(load_predictions, runs["baseline"])]
    kappa = result["methods"]["baseline"]["metrics"]["kappa_quadratic"]
    assert kappa["per_seed"] == pytest.approx(by_seed) and kappa["low"] <= kappa["mean"] <= kappa["high"]
    md, _ = write_benchmark_report(tmp_path, runs, result, {})
    assert "| kappa | kappa_quadratic | ece |" in md.read_text()


def test_a_single_seed_cell_shows_no_spread_it_cannot_have():
    """One seed has no standard deviation; '± 0.000' would read as a perfectly stable method."""
    from diffmed.benchmark.report import seed_cell

    one = {"mean": 0.5, "std": 0.0, "low": 0.4, "high": 0.6, "per_seed": [0.5]}
    two = {"mean": 0.5, "std": 0.1, "low": 0.4, "high": 0.6, "per_seed": [0.43, 0.57]}
    assert seed_cell(one) == "0.500 [0.400, 0.600]"
    assert seed_cell(two) == "0.500 ± 0.100 [0.400, 0.600]"


def _alive(pid: int) -> bool:
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:  # reaped
        return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_a_killed_parallel_benchmark_stops_its_worker_processes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "sleeper.py").write_text(
        "import os, time\nfrom pathlib import Path\n\n"
        "def record_pid_and_sleep(path):\n    Path(path).write_text(str(os.getpid()))\n    time.sleep(300)\n")
    body = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from pathlib import Path\nfrom sleeper import record_pid_and_sleep\n"
            "from diffmed.benchmark.runner import Job, run_jobs\n"
            f"root = Path({str(tmp_path)!r})\n"
            "run_jobs([Job(n, record_pid_and_sleep, (root / f'{n}.pid',), root / n) for n in 'ab'], workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", body], stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / f"{n}.pid" for n in "ab"]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and p.read_text() for p in pids):
        exited = proc.poll() is not None
        assert not exited and time.monotonic() < deadline, proc.stderr.read() if exited else "timeout"
        time.sleep(0.2)
    workers = [int(p.read_text()) for p in pids]
    assert all(_alive(pid) for pid in workers)
    os.kill(proc.pid, signal.SIGTERM)  # the benchmark's own process only, as `kill PID` does
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "worker processes outlived the killed benchmark"


def test_a_partial_report_shows_the_largest_complete_grid_of_finished_runs(tmp_path):
    from types import SimpleNamespace

    full = load_benchmark("full")
    runs = {m: [tmp_path / f"{m}-s{i}" for i in range(3)] for m in ("baseline", "class_weighted", "diffmic_v2", "dcube")}

    def plan(**finished):  # seeds finished per method, in order
        return {"runs": runs, "jobs": [SimpleNamespace(out=d, finished=i < finished.get(m, 0))
                                       for m, dirs in runs.items() for i, d in enumerate(dirs)]}

    assert full.reported(plan(baseline=3, class_weighted=3, diffmic_v2=1)) == ([0, 1, 2], ["baseline", "class_weighted"])
    assert full.reported(plan(baseline=3, class_weighted=2, diffmic_v2=2)) == (
        [0, 1], ["baseline", "class_weighted", "diffmic_v2"])  # 3 methods x 2 seeds beat 1 x 3
    assert full.reported(plan(baseline=3, class_weighted=3, diffmic_v2=3, dcube=3))[0] == [0, 1, 2]
    assert full.reported(plan(class_weighted=3, diffmic_v2=3)) == ([], [])  # never without the baseline
    # seed 0 of every method (4 runs) is a smaller grid than 2 methods x 3 seeds; the rest shows as unfinished rows
    assert full.reported(plan(baseline=3, class_weighted=3, diffmic_v2=1, dcube=1)) == (
        [0, 1, 2], ["baseline", "class_weighted"])
    assert full.reported(plan(baseline=1, class_weighted=1, diffmic_v2=1, dcube=1)) == (
        [0], ["baseline", "class_weighted", "diffmic_v2", "dcube"])


def test_methods_left_out_of_a_partial_table_show_on_the_seeds_they_have(tmp_path):
    """On the committed PneumoniaMNIST records: dcube finished on seed 0 only, next to a two-seed table."""
    from pathlib import Path
    from types import SimpleNamespace

    full = load_benchmark("full")
    records = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full" / "pneumoniamnist"
    runs = {m: [tmp_path / "runs" / f"{m}-s{i}" for i in range(2)] for m in ("baseline", "class_weighted", "dcube")}
    finished = {"baseline": 2, "class_weighted": 2, "dcube": 1}
    plan = {"runs": runs, "jobs": [SimpleNamespace(out=d, finished=i < finished[m])
                                   for m, dirs in runs.items() for i, d in enumerate(dirs)]}
    seeds, shown = full.reported(plan)
    assert (seeds, shown) == ([0, 1], ["baseline", "class_weighted"])
    rows = full.unfinished_rows(plan, records, shown)
    assert list(rows) == ["dcube"] and rows["dcube"]["seeds"] == [0]
    seed0 = json.loads((records / "runs" / "dcube-s0" / "metrics.json").read_text())["test"]
    assert rows["dcube"]["metrics"]["f1_macro"]["mean"] == pytest.approx(seed0["f1_macro"])
    assert len(rows["dcube"]["vs_baseline"]["mcnemar_p"]) == 1  # paired with the baseline's seed 0 only
    markdown = full.table({"pneumoniamnist": {**full.with_missing({"seeds": seeds, "methods": {
        m: rows["dcube"] for m in shown}, "unfinished": rows}, ["baseline", "class_weighted", "dcube"])}})
    assert "Not finished on those seeds yet" in markdown and "| dcube | [0] |" in markdown


def test_balance_to_sets_the_synthetic_share_and_full_benchmark_caps_ham10000(tmp_path):
    def share(balance_to=None):
        plan = plan_jobs(["diffusion_rebalance"], [], [0], BUDGETS["full"], tmp_path, balance_to)
        return next(j for j in plan["jobs"] if j.name == "synthetic-s0").args[3]

    assert share() == BUDGETS["full"].balance_to == 1.0
    assert share(0.25) == 0.25
    with pytest.raises(ConfigError, match="--balance-to 0"):
        share(0.0)
    assert load_benchmark("full").BALANCE_TO == {"ham10000": 0.25}


def test_method_params_set_one_method_and_full_benchmark_shrinks_ham10000s_vae(tmp_path):
    params = parse_method_params(["diffusion_classifier.vae_width=16", "diffusion_classifier.vae_epochs=10"])
    assert params == {"diffusion_classifier": {"vae_width": 16, "vae_epochs": 10}}
    plan = plan_jobs(["baseline", "diffusion_classifier"], [], [0], BUDGETS["full"], tmp_path, method_params=params)
    overrides = {j.name: j.args[0] for j in plan["jobs"]}
    assert "method.params.vae_width=16" in overrides["diffusion_classifier-s0"]
    assert "method.params.pretrain_epochs=10" in overrides["diffusion_classifier-s0"]  # the budget's stay
    assert not any("vae_width" in o for o in overrides["baseline-s0"])
    for bad in ("vae_width=16", "dcube_x.vae_width=16", "diffusion_classifier.vae_width"):
        with pytest.raises(ConfigError, match=re.escape(f"--param '{bad}'")):
            parse_method_params([bad])
    assert load_benchmark("full").METHOD_PARAMS == {"ham10000": {"diffusion_classifier": {"vae_width": 16,
                                                                                        "vae_epochs": 10}}}
