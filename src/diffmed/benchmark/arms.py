"""The methods a benchmark compares ("arms"), the shared stages they need, and the two budgets.

Shared stages are trained once per seed and reused: one class-conditional generator serves D-Cube (its
frozen feature extractor) and diffusion rebalancing (its synthetic images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffmed.benchmark.runner import Job
from diffmed.errors import ConfigError


@dataclass(frozen=True)
class Arm:
    method: str
    params: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    generator: bool = False
    """Needs the seed's generator (passed as method.params.generator_run)."""
    synthetic: bool = False
    """Trains on real + the seed's class-balancing synthetic images."""
    about: str = ""


ARMS: dict[str, Arm] = {
    "baseline": Arm("baseline", about="ResNet-18, cross-entropy"),
    "class_weighted": Arm("baseline", {"class_weighting": True}, about="ResNet-18, inverse-frequency weighted loss"),
    "traditional_rebalance": Arm("baseline", {"balanced_sampler": True}, ("augment.policy=traditional",),
                                 about="balanced sampling of traditionally augmented images (thesis's combined policy)"),
    "diffusion_rebalance": Arm("baseline", synthetic=True,
                               about="real images + class-conditional DDIM images filling every class toward the "
                                     "largest (the budget's share of it)"),
    "diffmic_v2": Arm("diffmic_v2", about="DiffMIC-v2: label-space diffusion with DCG priors, 10 DDIM steps"),
    "dcube": Arm("dcube", generator=True, about="D-Cube: KS-selected hyper-features of the frozen L_Gen generator"),
    "diffusion_classifier": Arm("diffusion_classifier",
                                about="class-conditional DiT classifying by its denoising error (full budget: epsilon)"),
}


@dataclass(frozen=True)
class Budget:
    seeds: int
    epochs: dict[str, int]
    """Classifier epochs per method (key "*" for the rest)."""
    train_overrides: tuple[str, ...]
    generator: dict
    generator_overrides: tuple[str, ...]
    """Config overrides of the generator stage (its batch size)."""
    generate_steps: int
    balance_to: float
    """Synthetic images fill every class up to this share of the largest class."""
    method_params: dict[str, dict]


BUDGETS: dict[str, Budget] = {
    # quick: the README's main job, about 15 minutes on 2 CPU cores for PneumoniaMNIST
    "quick": Budget(
        seeds=1, epochs={"*": 2},
        # 48 small batches, not 12 large ones: the same images, but enough updates that every arm leaves the
        # majority-class prediction (with 12 steps of 128 every arm predicted "pneumonia" for all test images)
        train_overrides=("train.batch_size=32", "train.limit_train_batches=48", "eval.bootstrap=500"),
        generator={"size": "tiny", "max_epochs": 2, "sample_every_n_epochs": 2, "sample_steps": 10},
        generator_overrides=(), generate_steps=10, balance_to=0.45,
        method_params={"diffmic_v2": {"dcg_epochs": 1}, "dcube": {"ks_images": 64},
                       "diffusion_classifier": {"pretrain_epochs": 1, "timesteps": "strided", "num_timesteps": 4}},
    ),
    # full: the protocol behind the README's numbers, sized for 2 CPU cores with the settings the per-method
    # benchmarks measured there: the rebalancing benchmark's generator (tiny L_Gen UNet, 20 epochs at batch 32,
    # 38 min), DDIM 25 steps, DiffMIC-v2's DCG as long as every classifier, the pre-training benchmark's tiny DiT
    "full": Budget(
        seeds=3, epochs={"*": 8},
        train_overrides=("eval.bootstrap=1000",),
        generator={"size": "tiny", "max_epochs": 20, "lr": 5e-4},
        generator_overrides=("train.batch_size=32",), generate_steps=25, balance_to=1.0,
        method_params={"diffmic_v2": {"dcg_epochs": 8},
                       # epsilon (Li et al.), not Zero: chosen on seed 0's validation split of PneumoniaMNIST, where
                       # Zero's chosen epoch had balanced accuracy 0.620 / AUC 0.688 and epsilon's first five 0.72-0.81
                       # / 0.81-0.88 (the pre-training benchmark's readouts compare the same way)
                       "diffusion_classifier": {"size": "tiny", "pretrain_epochs": 10, "pretrain_lr": 3e-4,
                                                "score": "epsilon"}},
    ),
}


def parse_method_params(items: list[str]) -> dict[str, dict]:
    """``METHOD.PARAM=VALUE`` options as {method: {param: value}} (values parsed as YAML)."""
    from diffmed.config import parse_key_values

    out: dict[str, dict] = {}
    known = {a.method for a in ARMS.values()}
    for key, value in parse_key_values(items, "--param").items():
        method, _, param = key.partition(".")
        if not param or method not in known:
            raise ConfigError(f"--param '{key}={value}' must read METHOD.PARAM=VALUE with METHOD one of "
                              f"{', '.join(sorted(known))}")
        out.setdefault(method, {})[param] = value
    return out


def parse_methods(text: str) -> list[str]:
    names = list(ARMS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in ARMS]
    if unknown:
        raise ConfigError(f"unknown benchmark method(s) {unknown}; choose from all, {', '.join(ARMS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")  # every arm is compared against it
    return names


def _generator_job(data: list[str], seed: int, budget: Budget, out: Path) -> Job:
    overrides = [*data, f"train.seed={seed}", "train.progress=false", *budget.generator_overrides]
    return Job(f"generator-s{seed}", train_generator_stage, (overrides, out, budget.generator), out,
               done="generator/model.safetensors")


def _synthetic_job(seed: int, budget: Budget, gen: Path, out: Path, balance_to: float) -> Job:
    return Job(f"synthetic-s{seed}", generate_stage, (gen, out, budget.generate_steps, balance_to, seed), out,
               done=".complete",
               after=[f"generator-s{seed}"])


def plan_jobs(methods: list[str], data: list[str], seeds: list[int], budget: Budget, root: Path,
              balance_to: float | None = None, method_params: dict[str, dict] | None = None) -> dict[str, list]:
    """All jobs of a benchmark; returns {"jobs": [...], "runs": {method: [run dirs by seed]}}.

    ``balance_to`` replaces the budget's share of the largest class that synthetic images fill each class to;
    ``method_params`` ({method: {param: value}}) adds to or replaces the budget's parameters of a method."""
    balance_to = budget.balance_to if balance_to is None else balance_to
    if not 0 < balance_to <= 10:
        raise ConfigError(f"--balance-to {balance_to} must be a share of the largest class in (0, 10]")
    jobs: list[Job] = []
    runs: dict[str, list[Path]] = {m: [] for m in methods}
    for seed in seeds:
        gen, syn = root / "stages" / f"generator-s{seed}", root / "stages" / f"synthetic-s{seed}"
        arms = [ARMS[m] for m in methods]
        if any(a.generator or a.synthetic for a in arms):
            jobs.append(_generator_job(data, seed, budget, gen))
        if any(a.synthetic for a in arms):
            jobs.append(_synthetic_job(seed, budget, gen, syn, balance_to))
        for name in methods:
            arm, run_dir = ARMS[name], root / "runs" / f"{name}-s{seed}"
            epochs = budget.epochs.get(name, budget.epochs["*"])
            params = {**budget.method_params.get(arm.method, {}), **(method_params or {}).get(arm.method, {}),
                      **arm.params}
            if arm.generator:
                params["generator_run"] = str(gen)
            overrides = [*data, f"method.name={arm.method}", f"train.seed={seed}", f"train.max_epochs={epochs}",
                         "train.progress=false", *budget.train_overrides, *arm.overrides,
                         *(f"method.params.{k}={v}" for k, v in params.items())]
            after = [f"generator-s{seed}"] if arm.generator else []
            if arm.synthetic:
                overrides.append(f"data.synthetic=[{syn / 'manifest.csv'}]")
                after = [f"synthetic-s{seed}"]
            jobs.append(Job(f"{name}-s{seed}", train_arm, (overrides, run_dir), run_dir, after=after))
            runs[name].append(run_dir)
    return {"jobs": jobs, "runs": runs}


def check_finished_runs(jobs: list[Job]) -> None:
    """Finished runs and generators (restored records too) must have been trained with the settings planned now:
    a table never mixes in a run left by another budget or code version."""
    from diffmed.bench import check_same_settings
    from diffmed.config import load_config

    stages = {j.name: j for j in jobs if j.fn is generate_stage}
    for job in (j for j in jobs if j.finished):
        synthetic = next((stages[n] for n in (job.name, *job.after) if n in stages), None)
        counts = planned_synthetic_counts(synthetic) if synthetic else None
        if job.fn is train_arm:
            check_same_settings(job.out, load_config(None, job.args[0]), synthetic_counts=counts)
        elif job.fn is train_generator_stage:
            check_same_settings(job.out, load_config(None, job.args[0]), generator_params=job.args[2])
        elif job.fn is generate_stage:
            check_same_settings(job.out, None, synthetic_counts=counts)


def planned_synthetic_counts(job: Job) -> dict[str, int] | None:
    """Images per class a synthetic stage makes (from its generator's class counts and the share planned now),
    or None while the generator has not finished."""
    from diffmed.bench import GENERATOR_DONE
    from diffmed.diffusion.generate import request_counts
    from diffmed.diffusion.generative import read_generator_meta

    generator_run, _, _, balance_to, _ = job.args
    if not (generator_run / GENERATOR_DONE).is_file():
        return None
    meta = read_generator_meta(generator_run)
    return request_counts(list(meta["spec"]["class_names"]), meta.get("class_counts"), balance_to=balance_to)


# --- job functions (top level, so worker processes can import them) ---------------------------------
def train_arm(overrides: list[str], run_dir: Path) -> None:
    from diffmed.bench import run_or_resume

    run_or_resume(overrides, run_dir)


def train_generator_stage(overrides: list[str], run_dir: Path, params: dict) -> None:
    from diffmed.config import load_config
    from diffmed.diffusion.generative import train_generator

    resume = (run_dir / "config.yaml").is_file()
    train_generator(None if resume else load_config(None, overrides), run_dir, params, resume=resume)


def generate_stage(generator_run: Path, out: Path, steps: int, balance_to: float, seed: int) -> None:
    from diffmed.diffusion.generate import generate

    generate(generator_run, out, balance_to=balance_to, steps=steps, seed=seed)
    (out / ".complete").write_text("done\n")
