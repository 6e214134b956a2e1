"""Diffusion Classifier (Li et al.) and Diffusion Classifier Zero (Ukita et al., Eqs. 3-4) on a latent DiT
pre-trained without labels, plus a linear probe on its representation.

``diffusion_classifier``: ``fit_stages`` pre-trains the DiT on the unlabelled images (or loads
``pretrained_run``), the main fit tunes it class-conditionally (DDPM loss with labels, null-class
dropout) on the labelled images, and a test image x is assigned

    y = argmin_c E_{t,eps} || z_0 - z'_0(z_t, c, t) ||^2    (score="x0", Zero; Eq. 3-4)
    y = argmin_c E_{t,eps} || eps - g(z_t, c, t) ||^2        (score="epsilon", Li et al.)

Since z_0 - z'_0 = (delta_t / gamma_t)(g - eps), Zero is the epsilon classifier with each timestep's
error weighted by (1 - abar_t) / abar_t: it listens mostly to the largest timesteps of the set.

What makes it usable (the public code's flaws are not repeated):
* one fixed, seeded noise bank (explicit torch.Generator): every candidate class of every image sees
  the identical noise tensors and timesteps, so class differences are not noise differences, and
  predictions are deterministic and independent of batch composition;
* classes x timesteps x images go through the DiT as large batched forward passes;
* adaptive pruning: after a first round of evaluations only the ``keep_top`` best classes (by raw error, or by
  the readout with ``prune_by``) are scored on the rest; ``forward_passes_per_image`` reports the count actually run;
* calibrated probabilities: logits are -errors / (mean error over the scored classes), times a gain
  fitted (without labels) so the median class gap on validation is 1, plus per-class offsets fitted on
  validation (``class_bias``); the engine's validation temperature then calibrates them (a softmax over
  raw errors gives about 1/N per class).

``dit_probe``: a linear (or fine-tuned) head on r = f_phi(z_0) of the representation-conditioned DiT,
or on pooled denoiser tokens at a fixed timestep and fixed noise for the unconditional one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from diffmed.diffusion.dit import LatentDiT, load_shared_weights
from diffmed.diffusion.pretrain import (PretrainParams, Pretrained, build_codec_for, build_dit, check_compatible,
                                        ddpm_loss, make_scheduler, pretrain_stage)
from diffmed.errors import ConfigError
from diffmed.methods.base import BaseParams, ClassifierMethod, StageContext
from diffmed.methods.registry import METHODS

PAPER_TIMESTEPS = tuple(range(100, 1000, 100))
"""The grid at which the paper inspects z'_0 (Fig. 9): t = 100, 200, ..., 900."""
ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(candidate classes (N, k), evaluation indices (E,)) -> errors (N, k, E)."""


def timestep_set(choice: str | list[int], num_train_timesteps: int, num_timesteps: int) -> list[int]:
    """``paper`` (100..900), ``strided`` (``num_timesteps`` centred strides over [0, T)) or a list."""
    if choice == "paper":
        ts = [t * num_train_timesteps // 1000 for t in PAPER_TIMESTEPS]
    elif choice == "strided":
        if num_timesteps < 1:
            raise ConfigError("method.params.num_timesteps must be >= 1")
        stride = num_train_timesteps / num_timesteps
        ts = [int(stride * (i + 0.5)) for i in range(num_timesteps)]
    elif isinstance(choice, list):
        ts = [int(t) for t in choice]
    else:
        raise ConfigError(f"method.params.timesteps='{choice}' is unknown; use paper, strided or a list")
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad or not ts:
        raise ConfigError(f"method.params.timesteps must be in [0, {num_train_timesteps}); got {bad or 'none'}")
    return sorted(set(ts))


@dataclass
class EvalPlan:
    """The (timestep, noise) evaluations per image and how they split into the pruning rounds."""

    t: torch.Tensor
    """(E,) timestep of evaluation e; evaluation e always uses noise tensor e of the bank."""
    first: torch.Tensor
    """Evaluations every class gets (spread over the timestep range)."""
    rest: torch.Tensor
    """Evaluations only the ``keep_top`` best classes of the first round get."""
    keep_top: int

    def passes(self, num_classes: int) -> int:
        """DiT forward passes per image."""
        return num_classes * len(self.first) + min(self.keep_top, num_classes) * len(self.rest)


def make_plan(timesteps: list[int], trials: int, num_classes: int, prune: bool = True,
              prune_after: int | None = None, keep_top: int | None = None) -> EvalPlan:
    """Every timestep ``trials`` times; with pruning, a first round of ``prune_after`` evaluations
    (default half) spread evenly over the sorted timesteps, then the ``keep_top`` (default ceil(K/2)) best classes
    (none when only one survives, e.g. a binary task: its scores are then the first round's)."""
    t = torch.tensor(timesteps, dtype=torch.long).repeat_interleave(trials)
    e = len(t)
    keep = keep_top or math.ceil(num_classes / 2)
    if keep < 1:
        raise ConfigError("method.params.keep_top must be >= 1")
    if not prune or keep >= num_classes or e < 2:
        return EvalPlan(t, torch.arange(e), torch.zeros(0, dtype=torch.long), num_classes)
    n1 = prune_after or math.ceil(e / 2)
    if not 1 <= n1 <= e:
        raise ConfigError(f"method.params.prune_after={n1} must be between 1 and the {e} evaluations per class")
    first = torch.unique(torch.linspace(0, e - 1, n1).round().long())
    rest = torch.tensor([i for i in range(e) if i not in set(first.tolist())], dtype=torch.long)
    if keep == 1:  # one survivor is the argmin already: more evaluations cannot change the prediction
        rest = rest[:0]
    return EvalPlan(t, first, rest, keep)


def adaptive_relative_errors(error_fn: ErrorFn, n_images: int, num_classes: int, plan: EvalPlan,
                             device: torch.device | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) mean error of each class relative to the mean over the classes scored to the end.

    ``offsets`` (K,): what the readout subtracts from each class's relative error (its class bias over its gain);
    the first round keeps the classes whose error minus offset is lowest, so a class the denoiser reconstructs worse
    for every image is pruned no more often than its offset says. Pruned classes keep their first-round ratio (to
    the kept classes' first-round mean), raised so that, offsets included, none beats the worst kept class: a pruned
    class never wins and the scale matches.
    """
    classes = torch.arange(num_classes, device=device).expand(n_images, num_classes)
    e1 = error_fn(classes, plan.first)
    m1 = e1.mean(-1)
    if len(plan.rest) == 0:
        return m1 / m1.mean(1, keepdim=True).clamp_min(1e-12)
    off = torch.zeros(num_classes, device=m1.device) if offsets is None else offsets.to(m1)
    rel = m1 / m1.mean(1, keepdim=True).clamp_min(1e-12)
    kept = (rel - off).topk(plan.keep_top, dim=1, largest=False).indices
    e2 = error_fn(kept, plan.rest)
    first_kept = e1.gather(1, kept[..., None].expand(-1, -1, e1.shape[-1]))
    full = (first_kept.sum(-1) + e2.sum(-1)) / (e1.shape[-1] + e2.shape[-1])
    rel_kept = full / full.mean(1, keepdim=True).clamp_min(1e-12)
    rel = m1 / m1.gather(1, kept).mean(1, keepdim=True).clamp_min(1e-12)
    worst_kept = (rel_kept - off[kept]).max(1, keepdim=True).values
    rel = torch.maximum(rel, worst_kept + off)
    return rel.scatter(1, kept, rel_kept)


def per_evaluation_relative(error_fn: ErrorFn) -> ErrorFn:
    """Each evaluation's errors divided by their mean over the candidate classes, so that every timestep has an
    equal say in the average (x0 errors grow with t as (1 - abar_t) / abar_t and would otherwise decide)."""
    def relative(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
        e = error_fn(classes, evals)
        return e / e.mean(1, keepdim=True).clamp_min(1e-12)

    return relative


def seeded_noise(n: int, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n Gaussian noise tensors from an explicit generator (the same on every call and device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(device)


@dataclass
class DiffusionScorer:
    """Scores latents z_0 against class labels with a class-conditioned DiT (one fixed noise bank)."""

    dit: LatentDiT
    alphas_cumprod: torch.Tensor
    plan: EvalPlan
    score: Literal["x0", "epsilon"] = "x0"
    batch_size: int = 512
    seed: int = 0
    per_timestep: bool = False
    """Compare classes per evaluation before averaging (``per_evaluation_relative``)."""
    passes: int = 0
    """DiT rows evaluated so far (for the cost tables)."""
    _bank: dict = field(default_factory=dict)

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Noise tensor e of evaluation e; keyed by the plan's size too, as the plan can be swapped after use."""
        key = (len(self.plan.t), tuple(shape), str(device))
        if key not in self._bank:
            self._bank[key] = seeded_noise(len(self.plan.t), shape, self.seed, device)
        return self._bank[key]

    def error_fn(self, z0: torch.Tensor) -> ErrorFn:
        """Errors of every (image, candidate class, evaluation); classes share each evaluation's z_t."""
        bank = self.noise(z0.shape[1:], z0.device)
        abar = self.alphas_cumprod.to(z0.device)

        def errors(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
            n, k, e = classes.shape[0], classes.shape[1], len(evals)
            evals = evals.to(z0.device)
            t = self.plan.t.to(z0.device)[evals]
            gamma, delta = abar[t].sqrt(), (1 - abar[t]).sqrt()
            view = (-1,) + (1,) * (z0.ndim - 1)
            eps = bank[evals]
            z_t = gamma.view(view)[None] * z0[:, None] + delta.view(view)[None] * eps[None]  # (N, E, ...)
            grid = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(k), torch.arange(e), indexing="ij"), -1)
            rows = grid.reshape(-1, 3).to(z0.device)
            out = torch.empty(len(rows), device=z0.device)
            for s in range(0, len(rows), self.batch_size):
                i, j, v = rows[s : s + self.batch_size].unbind(1)
                pred = self.dit(z_t[i, v], t[v], y=classes[i, j]).float()
                if self.score == "epsilon":
                    err = pred - eps[v].float()
                else:  # Eq. 3: z'_0 = (z_t - delta_t g) / gamma_t
                    z0_pred = (z_t[i, v].float() - delta[v].view(view) * pred) / gamma[v].view(view)
                    err = z0[i].float() - z0_pred
                out[s : s + len(i)] = err.pow(2).flatten(1).mean(1)
            self.passes += len(rows)
            return out.view(n, k, e)

        return errors

    @torch.no_grad()
    def relative_errors(self, z0: torch.Tensor, num_classes: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
        fn = per_evaluation_relative(self.error_fn(z0)) if self.per_timestep else self.error_fn(z0)
        return adaptive_relative_errors(fn, len(z0), num_classes, self.plan, z0.device, offsets)


def median_class_gap(relative: torch.Tensor) -> float:
    """Median over images of (worst - best) relative error: the scale the logit gain divides out."""
    return float((relative.max(1).values - relative.min(1).values).median())


class DiffusionParams(BaseParams, PretrainParams):
    score: Literal["x0", "epsilon"] = "x0"
    """x0: Diffusion Classifier Zero (Eq. 3-4); epsilon: the original Diffusion Classifier."""
    error_norm: Literal["pooled", "per_timestep"] = "pooled"
    """pooled: each class's error averaged over the evaluations, then compared (the papers); per_timestep: the
    classes compared within each evaluation (error over its mean across classes), then averaged."""
    timesteps: Literal["paper", "strided"] | list[int] = "paper"
    num_timesteps: int = 10
    """Timesteps of the ``strided`` set."""
    noise_trials: int = 1
    """Noise draws per timestep."""
    prune: bool = True
    prune_by: Literal["error", "readout"] = "error"
    """Which classes the first round keeps. error: the lowest raw error (a pruned class can then still win through
    its class offset, on its first-round error alone); readout: the best logits, offsets included, so a pruned class
    never wins. The default follows validation: on RetinaMNIST (3 seeds) readout had the lower validation AUC on
    every seed, and test macro-F1 0.269 against 0.271
    (``benchmarks/results/full/retinamnist/variants/prune-by-readout.md``)."""
    prune_after: int | None = None
    """Evaluations per class in the first round (default half of them)."""
    keep_top: int | None = None
    """Classes scored after the first round (default ceil(K/2))."""
    eval_batch_size: int = 512
    noise_seed: int = 0
    null_class_prob: float = 0.1
    """Label dropout to the null class while tuning."""
    class_bias: bool = True
    """Add per-class offsets fitted on validation (class-balanced NLL) to the logits. Without them a denoiser that
    reconstructs one class better for every image makes argmin pick that class for all of them (measured on
    PneumoniaMNIST with 10% labels: the published readout gave one class to every test image on 3 of 3 seeds)."""


@METHODS.register("diffusion_classifier")
class DiffusionClassifier(ClassifierMethod):
    """Class-conditioned latent DiT tuned from a self-supervised pre-training; classifies by argmin error."""

    Params = DiffusionParams

    def __init__(self, spec, params: DiffusionParams, optim, max_epochs, class_counts=None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        if spec.multilabel or spec.num_outputs != spec.num_classes:
            raise ConfigError("diffusion_classifier scores one label per image (binary, multiclass, ordinal); "
                              "use dit_probe for multi-label tasks")
        self.codec = build_codec_for(params, spec.channels, spec.image_size).requires_grad_(False)
        self.dit = build_dit(params, self.codec, spec.image_size, "class", spec.num_classes)
        self.ddpm = make_scheduler(params)
        ts = timestep_set(params.timesteps, params.num_train_timesteps, params.num_timesteps)
        plan = make_plan(ts, params.noise_trials, spec.num_classes, params.prune, params.prune_after, params.keep_top)
        self.scorer = DiffusionScorer(self.dit, self.ddpm.alphas_cumprod, plan, params.score,
                                      params.eval_batch_size, params.noise_seed, params.error_norm == "per_timestep")
        self.register_buffer("logit_gain", torch.tensor(1.0))
        self.register_buffer("logit_bias", torch.zeros(spec.num_classes))
        self.register_load_state_dict_pre_hook(_zero_bias_if_missing)
        self._images_scored = 0

    def fit_stages(self, ctx: StageContext) -> None:
        adopt_pretrained(self, pretrain_stage(self.params, self.spec, ctx), shared_only=True)

    def training_loss(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            z0 = self.codec.eval().encode(batch["image"])
        y = batch["target"].long()
        drop = torch.rand(len(y), device=y.device) < self.params.null_class_prob
        weights = self.class_weights[y] if self.class_weights is not None else None
        return ddpm_loss(self.dit, self.ddpm, z0, torch.where(drop, self.dit.null_label, y), weights)

    @torch.no_grad()
    def relative_errors(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K) error of each class over the mean error (no gain): argmin is the prediction."""
        z0 = self.codec.eval().encode(images)
        self._images_scored += len(images)
        offsets = self.logit_bias / self.logit_gain if self.params.prune_by == "readout" else None
        return self.scorer.relative_errors(z0, self.spec.num_classes, offsets)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return -self.relative_errors(images) * self.logit_gain + self.logit_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)

    def forward_passes_per_image(self) -> float:
        if self._images_scored:
            return self.scorer.passes / self._images_scored
        return float(self.scorer.plan.passes(self.spec.num_classes))

    def fit_readout(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Refit gain (label-free: median class gap 1) and class bias on validation logits made with the current
        ones; returns those logits under the new readout."""
        from diffmed.evaluation.metrics import fit_class_bias

        relative = -(logits - self.logit_bias) / self.logit_gain
        gap = median_class_gap(relative)
        if gap > 0:
            self.logit_gain.fill_(1.0 / gap)
        scaled = -relative * self.logit_gain
        if self.params.class_bias and len(torch.unique(targets)) > 1:
            # balanced: argmin of the error is Bayes' rule under a uniform prior; the offsets keep it that way
            bias = fit_class_bias(scaled.double().numpy(), targets.long().numpy(), self.spec.task, balanced=True)
            self.logit_bias.copy_(torch.from_numpy(bias).to(self.logit_bias))
        return scaled + self.logit_bias

    def on_validation_epoch_end(self) -> None:
        """Fit the readout on this epoch's validation errors, then log the metrics."""
        if self._val_outputs:
            logits, targets, masks = (torch.cat(t) for t in zip(*self._val_outputs))
            self._val_outputs = [(self.fit_readout(logits, targets), targets, masks)]
        super().on_validation_epoch_end()


def _zero_bias_if_missing(module, state_dict, prefix, *args) -> None:
    """Models saved before ``logit_bias`` existed load with no offsets (their readout had none)."""
    state_dict.setdefault(prefix + "logit_bias", torch.zeros_like(module.logit_bias))


def adopt_pretrained(method: ClassifierMethod, pre: Pretrained, shared_only: bool) -> None:
    """Load the pre-trained codec and DiT into ``method`` (only the mode-shared weights when tuning)."""
    where = f"pretrained_run '{method.params.pretrained_run}'" if method.params.pretrained_run else "the pre-training"
    check_compatible(pre, method.params, method.codec, where)
    method.codec.load_state_dict(pre.codec.state_dict())
    if shared_only:
        load_shared_weights(pre.dit, method.dit, where)
    elif pre.dit.cfg != method.dit.cfg:
        raise ConfigError(f"{where} does not match this DiT ({pre.dit.cfg} vs {method.dit.cfg}); use the same "
                          "mode, size, patch_size and rep_dim as in pre-training")
    else:
        method.dit.load_state_dict(pre.dit.state_dict())


def probe_head(dim: int, outputs: int) -> nn.Module:
    """Linear readout on standardised features (BatchNorm without affine, as in MAE's linear probe)."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, outputs))


class ProbeParams(BaseParams, PretrainParams):
    feature: Literal["auto", "representation", "denoiser"] = "auto"
    """auto: r for a representation-conditioned DiT, denoiser tokens for an unconditional one."""
    probe_timestep: int = 100
    probe_block: int | None = None
    """Denoiser features after this many blocks (default: half the depth)."""
    finetune: bool = False
    """Train the encoder too (default: a linear probe on frozen features)."""
    noise_seed: int = 0


@METHODS.register("dit_probe")
class DiTProbe(ClassifierMethod):
    """A cheap readout of the pre-trained DiT: normalised features -> linear layer."""

    Params = ProbeParams

    def __init__(self, spec, params: ProbeParams, optim, max_epochs, class_counts=None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        self.codec = build_codec_for(params, spec.channels, spec.image_size).requires_grad_(False)
        self.dit = build_dit(params, self.codec, spec.image_size, params.mode)
        self.feature = params.feature if params.feature != "auto" else (
            "representation" if params.mode == "representation" else "denoiser")
        if self.feature == "representation" and params.mode != "representation":
            raise ConfigError("method.params.feature=representation needs mode=representation (r exists only there)")
        if not 0 <= params.probe_timestep < params.num_train_timesteps:
            raise ConfigError(f"method.params.probe_timestep must be in [0, {params.num_train_timesteps})")
        self.block = params.probe_block if params.probe_block is not None else self.dit.cfg.depth // 2
        dim = self.dit.cfg.rep_dim if self.feature == "representation" else self.dit.cfg.hidden
        self.head = probe_head(dim, spec.num_outputs)
        self.abar = float(make_scheduler(params).alphas_cumprod[params.probe_timestep])
        self.dit.requires_grad_(params.finetune)

    def fit_stages(self, ctx: StageContext) -> None:
        adopt_pretrained(self, pretrain_stage(self.params, self.spec, ctx), shared_only=False)
        self.dit.requires_grad_(self.params.finetune)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """r = f_phi(z_0), or mean denoiser tokens at ``probe_timestep`` with one fixed noise tensor."""
        with torch.set_grad_enabled(self.params.finetune and torch.is_grad_enabled()):
            z0 = self.codec.eval().encode(images)
            if self.feature == "representation":
                return self.dit.represent(z0)
            eps = seeded_noise(1, tuple(z0.shape[1:]), self.params.noise_seed, z0.device)
            z_t = math.sqrt(self.abar) * z0 + math.sqrt(1 - self.abar) * eps
            t = torch.full((len(z0),), self.params.probe_timestep, device=z0.device, dtype=torch.long)
            return self.dit.hidden_features(z_t, t, self.block, z0=z0 if self.dit.cfg.mode == "representation" else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
