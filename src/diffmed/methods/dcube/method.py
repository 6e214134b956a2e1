"""D-Cube (Jang et al.): a classifier on hyper-features of a frozen class-conditional diffusion model.

Step 1 (``fit_stages``): the class-conditional generator with the contrastive L_Gen
(``diffmed.diffusion.generative``) is trained into ``RUN/stages/generator`` (resumable), or taken from
``generator_run``; it is then frozen and kept inside the method (``frozen.net``), so the exported
``model.safetensors`` is self-contained and ``predict`` needs only the run folder. The KS Gaussianity
analysis of every block on training images picks the layers (``RUN/stages/dcube_selection.json``, plots
and tables in ``RUN/stages/gaussianity/``; both reused on resume).

Step 2 (the main fit): the selected block outputs for the input (``x0``, or ``xt`` noised) at a fixed
timestep go through the D-Cube head (head.py). Loss (Eq. 10):
``L_CLS = L_CE + lambda_cycle * L_Cycle + lambda_flip * L_CR`` with

* L_CE: the task's loss (cross-entropy; BCE for multi-label; class weighting / focal as for every method);
* L_Cycle (Eq. 7): mean squared difference of the frozen model's noise predictions for the same x_t
  under the predicted class and under the true class. The prediction enters as the SOFT class
  embedding ``embed_classes(softmax(logits))`` and the frozen model is NOT run under ``no_grad`` on this
  path, so the gradient reaches the head (the public code uses an argmax under no_grad: it trains nothing);
* L_CR (Eq. 8): ``mean_i ||g(x_i) - g(flip(x_i))||^2`` between the logits of an image and its mirror.

Training images are flipped horizontally with probability 0.5; the head (and the sub-feature CNN) keep
an EMA copy (decay 0.999, with warm-up) which is what validation, checkpoint choice, export and
prediction use. At test time the timestep and the noise (one tensor from a seeded ``torch.Generator``)
are fixed: an image always gets the same features and prediction.

Features are taken with the null class (the label is what is predicted, so it never enters the
features); the training timestep equals the test timestep (the paper draws a random one, which would
make the head see features it never meets at test time). Table IV's baseline "final output layer" is read
as the last block (``layers="last"``).

Ablations: ``TABLE_IV`` (baseline -> + L_Gen -> + feature selection -> + L_CLS -> + sub-features),
``TABLE_VI`` (best vs worst selection) and ``TABLE_VII`` (x0 vs xt input, t vs 0) give the method
options of each row. Leave ``train.ema_decay`` unset: the method keeps its own EMA head.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from diffmed.diffusion.generative import GenerativeParams, generator_dir
from diffmed.errors import ConfigError
from diffmed.methods.base import BaseParams, ClassifierMethod, StageContext
from diffmed.methods.dcube.features import FrozenDiffusion, feature_shapes, seeded_noise
from diffmed.methods.dcube.gaussianity import (DEFAULT_MAX_VALUES, DEFAULT_TIMESTEPS, Selection,
                                               analyze_gaussianity, read_selection, select_layers, write_analysis,
                                               write_selection)
from diffmed.methods.dcube.head import DCubeHead, SubFeatures
from diffmed.methods.registry import METHODS

log = logging.getLogger("diffmed.dcube")
STAGES = "stages"
GENERATOR_STAGE = "generator"
SELECTION_FILE = "dcube_selection.json"
ANALYSIS_DIR = "gaussianity"
PAPER_GENERATOR = {"backbone": "uvit"}
"""The paper's step-1 backbone (U-ViT); other generator options keep their own defaults."""
MAX_FEATURE_SIZE = 16

TABLE_IV: dict[str, dict[str, Any]] = {
    "baseline": {"generator": {"use_contrastive": False}, "layers": "last", "lambda_cycle": 0.0,
                 "lambda_flip": 0.0, "subfeatures": None},
    "+L_Gen": {"layers": "last", "lambda_cycle": 0.0, "lambda_flip": 0.0, "subfeatures": None},
    "+Fs": {"layers": "auto", "lambda_cycle": 0.0, "lambda_flip": 0.0, "subfeatures": None},
    "+L_Cls": {"layers": "auto", "subfeatures": None},
    "+f_sub": {"layers": "auto"},
}
"""Table IV rows, cumulative; the last row is the full method. Only ``baseline`` trains its generator
without the contrastive term (``generator.use_contrastive``)."""
TABLE_VI: dict[str, dict[str, Any]] = {"best": {"layers": "auto"}, "worst": {"layers": "worst"}}
TABLE_VII: dict[str, dict[str, Any]] = {"x0, t": {"input": "x0"}, "xt, t": {"input": "xt"},
                                         "x0, 0": {"input": "x0", "timestep": 0}}


class DCubeParams(BaseParams):
    """Options of D-Cube (``method.params``)."""

    generator_run: str | None = None
    """A trained generator (``diffmed generator train`` run folder or its ``generator/``); default: train
    one as this run's first stage with ``generator``."""
    generator: GenerativeParams = Field(default_factory=lambda: GenerativeParams(**PAPER_GENERATOR))
    """Step-1 options (L_Gen on by default; backbone U-ViT as in the paper). Replaced by the loaded
    generator's own options when ``generator_run`` is given, so model.json describes the stored weights."""
    generator_classes: int | None = Field(None, ge=1)
    """Set by the first stage: classes of the generator (recorded so the model rebuilds from model.json)."""
    layers: Literal["auto", "last", "worst"] | list[str] = "auto"
    """auto: the KS selection (non-Gaussian layers); last: the last block; worst: the most Gaussian layers
    (Table VI); or block names (``diffmed dcube analyze`` lists them)."""
    selected_layers: list[str] | None = None
    """Set by the first stage: the blocks actually used (recorded in model.json)."""
    timestep: int = Field(100, ge=0)
    """Timestep of the feature pass (fixed at training and test time; Fig. 2 analyses t=100)."""
    input: Literal["x0", "xt"] = "x0"
    """x0: the clean image with timestep t's embedding (the paper's best); xt: the image noised to t."""
    noise_seed: int = 0
    """Seed of the fixed test-time noise (xt input) and of the images picked for the KS analysis."""
    subfeatures: str | None = "resnet18"
    """timm CNN for the sub-features f_sub (fine-tuned with the head); None: diffusion features only."""
    subfeatures_pretrained: bool | str = False
    """False, True (timm hub weights, needs network) or a local weights file."""
    sub_channels: int = Field(3, ge=1)
    diffusion_channels: int = Field(1, ge=1)
    """Channels the selected hyper-features are reduced to before the conv stages. 1: the paper's single-channel
    map m, one number per pixel for every class. 16 did not help on RetinaMNIST (5 classes, 3 seeds: macro-F1 0.248
    against 0.271; ``benchmarks/results/full/retinamnist/variants/diffusion-channels-16.md``)."""
    pooled_features: bool = False
    """Also feed the spatial means of the selected blocks to the fully connected layers (not in the paper; see
    head.py). Off: the paper's head."""
    feature_size: int | None = Field(None, ge=2)
    """Common side of the feature maps in the head (default: the largest selected map, at most 16)."""
    head_width: int = Field(64, ge=8)
    """Channels of the first of the three 3x3/5x5 stages (then halved, then quartered)."""
    head_hidden: int = Field(256, ge=1)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lambda_cycle: float = Field(10.0, ge=0.0)
    """Weight of L_Cycle (the paper: 10 for pancreas CT, 100 for breast MRI); 0: off."""
    lambda_flip: float = Field(0.1, ge=0.0)
    """Weight of the flip-consistency L_CR (the paper: 0.1); 0: off."""
    cycle_timestep: int | None = Field(None, ge=0)
    """Timestep of the cycle loss's x_t (default: ``timestep``)."""
    random_flip: bool = True
    """Horizontal flip of training images with probability 0.5."""
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0)
    """EMA of the head used for evaluation and export (warm-up min(decay, (1+s)/(10+s))); None: raw weights."""
    ks_alpha: float = Field(0.05, gt=0.0, lt=1.0)
    ks_top_k: int | None = Field(None, ge=1)
    """Keep the k least Gaussian layers instead of those with p < ks_alpha."""
    ks_images: int = Field(256, ge=1)
    """Training images of the KS analysis (the paper: a batch of 256)."""
    ks_timesteps: list[int] = Field(default_factory=lambda: list(DEFAULT_TIMESTEPS))
    """Timestep grid of the analysis plot (``timestep`` is always added)."""
    ks_reduce: Literal["feature", "pvalue"] = "pvalue"
    """pvalue: mean over the images of each map's KS p-value; feature: KS of the batch-averaged map."""
    ks_values: int | None = Field(DEFAULT_MAX_VALUES, ge=8)
    """Values per KS test (seeded subsample; equal for every layer so p-values compare); None: all."""
    analysis_batch_size: int = Field(64, ge=1)

    @field_validator("generator", mode="before")
    @classmethod
    def _paper_generator(cls, value: Any) -> Any:
        """Partial generator options keep the paper's backbone unless they name one."""
        return {**PAPER_GENERATOR, **value} if isinstance(value, dict) else value


@METHODS.register("dcube")
class DCube(ClassifierMethod):
    """Frozen diffusion hyper-features -> D-Cube head, trained with L_CE + L_Cycle + L_CR."""

    Params = DCubeParams

    def __init__(self, spec, params: DCubeParams, optim, max_epochs, class_counts=None) -> None:
        super().__init__(spec, params, optim, max_epochs, class_counts)
        if spec.multilabel and params.lambda_cycle > 0:
            raise ConfigError("method.params.lambda_cycle must be 0 for multi-label data: the cycle loss conditions "
                              "the generator on one predicted class")
        self.class_counts = None if class_counts is None else np.asarray(class_counts)
        self._init_seed = torch.initial_seed()  # the run's seed: the head starts the same on resume
        self.frozen = FrozenDiffusion.build(params.generator, params.generator_classes or spec.num_classes,
                                            spec.channels, spec.image_size)
        self.register_buffer("test_noise", seeded_noise((1, spec.channels, spec.image_size, spec.image_size),
                                                        params.noise_seed), persistent=False)
        self.head: DCubeHead | None = None
        self.ema_head: DCubeHead | None = None
        self.layers: list[str] = []
        if params.selected_layers:
            self._build_head(params.selected_layers)

    # --- construction ----------------------------------------------------------------------------
    def _build_head(self, layers: list[str]) -> None:
        p, spec = self.params, self.spec
        self.layers = self.frozen.check_layers(layers, "method.params.selected_layers")
        shapes = feature_shapes(self.frozen, self.layers, spec.channels, spec.image_size)
        sides = [self.frozen.crop_side(s[-1]) for s in shapes.values()]
        size = p.feature_size or min(MAX_FEATURE_SIZE, max(sides))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed)
            sub = SubFeatures(p.subfeatures, spec.channels, spec.image_size, p.sub_channels,
                              p.subfeatures_pretrained) if p.subfeatures else None
            self.head = DCubeHead([s[0] for s in shapes.values()], size, spec.num_outputs, sub, p.sub_channels,
                                  p.head_width, p.head_hidden, p.head_dropout, p.diffusion_channels,
                                  p.pooled_features)
        self.ema_head = copy.deepcopy(self.head).requires_grad_(False).eval() if p.ema_decay else None

    def frozen_submodules(self) -> list[torch.nn.Module]:
        """The EMA head stays in eval mode (the frozen generator keeps its own eval mode)."""
        return [self.ema_head] if self.ema_head is not None else []

    # --- step 1: generator and layer selection -----------------------------------------------------
    def fit_stages(self, ctx: StageContext) -> None:
        """Train (or load) the generator, freeze it inside the method, select the layers, build the head."""
        stages = Path(ctx.run_dir) / STAGES
        self._adopt_generator(self._stage_generator(ctx, stages / GENERATOR_STAGE))
        layers = self.params.selected_layers or self._select(ctx, stages)
        self.params = self.params.model_copy(update={"selected_layers": layers})
        self._build_head(layers)

    def _stage_generator(self, ctx: StageContext, stage_dir: Path):
        from diffmed.diffusion.generative import fit_generator, load_generator

        p = self.params
        if p.generator_run:
            check_generator_split(Path(p.generator_run), Path(ctx.run_dir))
            return load_generator(Path(p.generator_run))
        if (generator_dir(stage_dir) / "model.json").is_file():
            return load_generator(stage_dir)
        dm = real_train_datamodule(ctx.datamodule)
        module = fit_generator(self.spec, p.generator, dm, stage_dir, ctx.make_trainer,
                               p.generator.max_epochs or self.max_epochs, dm.sets["train"].class_counts(),
                               resume=ctx.resume, meta={"stage": "dcube"})
        return module.cpu().eval()

    def _adopt_generator(self, generator) -> None:
        """Check the generator fits the data, record its options and keep its (EMA) weights, frozen."""
        g_spec, p = generator.spec, self.params
        where = f"method.params.generator_run '{p.generator_run}'" if p.generator_run else "the generator stage"
        if (g_spec.channels, g_spec.image_size) != (self.spec.channels, self.spec.image_size):
            raise ConfigError(f"{where} was trained on {g_spec.channels}-channel {g_spec.image_size} px images; this "
                              f"run has {self.spec.channels}-channel {self.spec.image_size} px images")
        if p.lambda_cycle > 0 and g_spec.class_names != self.spec.class_names:
            raise ConfigError(f"{where} has classes {g_spec.class_names}, this data {self.spec.class_names}: the cycle "
                              "loss needs the same classes in the same order (or set lambda_cycle=0)")
        self.params = p.model_copy(update={"generator": generator.params, "generator_classes": g_spec.num_classes})
        self.frozen = FrozenDiffusion.from_generator(generator).cpu()
        self.frozen.check_timestep(p.timestep)
        self.frozen.check_timestep(self.cycle_timestep, "method.params.cycle_timestep")

    def _select(self, ctx: StageContext, stages: Path) -> list[str]:
        """The layers of ``params.layers``; auto/worst read or make the KS selection (saved as JSON)."""
        p, path = self.params, stages / SELECTION_FILE
        if isinstance(p.layers, list):
            layers = self.frozen.check_layers(p.layers)
            write_selection(path, None, Selection(p.timestep, layers, [], p.ks_alpha, p.ks_top_k, note="explicit"))
            return layers
        if p.layers == "last":
            layers = self.frozen.block_names()[-1:]
            write_selection(path, None, Selection(p.timestep, layers, [], p.ks_alpha, p.ks_top_k, note="last block"))
            return layers
        selection = self._stored_selection(path)
        if selection is None:
            selection = self._run_analysis(ctx, stages, path)
        return selection.best if p.layers == "auto" else selection.worst

    def _stored_selection(self, path: Path) -> Selection | None:
        """A saved selection for these settings (reselected from its analysis if only alpha/top_k changed)."""
        if not path.is_file():
            return None
        selection, analysis, _ = read_selection(path)
        p = self.params
        if analysis is None or p.timestep not in analysis.timesteps or \
                (analysis.input, analysis.reduce, analysis.max_values) != (p.input, p.ks_reduce, p.ks_values):
            log.warning("%s was made with other analysis settings: redoing the KS analysis", path)
            return None
        if (selection.timestep, selection.alpha, selection.top_k) != (p.timestep, p.ks_alpha, p.ks_top_k):
            selection = select_layers(analysis, p.timestep, p.ks_alpha, p.ks_top_k)
            write_selection(path, analysis, selection)
        return selection

    def _run_analysis(self, ctx: StageContext, stages: Path, path: Path) -> Selection:
        from diffmed.engine.inference import pick_device

        p = self.params
        images = analysis_images(ctx.datamodule, p.ks_images, p.noise_seed)
        steps = sorted(set(p.ks_timesteps) | {p.timestep})
        analysis = analyze_gaussianity(self.frozen, images, None, steps, p.input, p.noise_seed,
                                       p.analysis_batch_size, p.ks_reduce, p.ks_values, pick_device())
        selection = select_layers(analysis, p.timestep, p.ks_alpha, p.ks_top_k)
        log.info("KS selection at t=%d: best %s, worst %s", p.timestep, selection.best, selection.worst)
        write_analysis(stages / ANALYSIS_DIR, analysis, selection)
        write_selection(path, analysis, selection)
        return selection

    # --- step 2: features, head, losses ------------------------------------------------------------
    @property
    def cycle_timestep(self) -> int:
        p = self.params
        return p.timestep if p.cycle_timestep is None else p.cycle_timestep

    def hyper_features(self, images: torch.Tensor, noise: torch.Tensor | None) -> list[torch.Tensor]:
        """The selected blocks' outputs (cropped to the image area) of one frozen forward pass."""
        if self.head is None:
            raise RuntimeError("D-Cube has no head yet: run fit_stages (the engine does) or load a trained run")
        t = self.params.timestep
        with torch.no_grad():
            x = self.frozen.model_input(images, t, self.params.input, noise)
            feats = self.frozen.features(x, t, self.layers)
        return [self.frozen.crop(f) for f in feats.values()]

    def logits_with(self, head: DCubeHead, images: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return head(self.hyper_features(images, noise), images)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic: fixed timestep, the fixed seeded noise, the EMA head in eval mode."""
        head = self.ema_head if self.ema_head is not None else self.head
        return self.logits_with(head, images, self.test_noise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)

    def forward_passes_per_image(self) -> float:
        """One frozen-generator pass, plus one sub-feature CNN pass when used (the head is small)."""
        return 1.0 + (1.0 if self.params.subfeatures else 0.0)

    def cycle_loss(self, x0: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 7 with a soft prediction: || eps(x_t, embed(softmax(logits))) - eps(x_t, y) ||^2 (mean)."""
        t = self.cycle_timestep
        x_t = self.frozen.add_noise(x0, t, torch.randn_like(x0))
        probs = torch.softmax(logits[:, : self.spec.num_classes].float(), dim=1)
        predicted = self.frozen.noise_prediction(x_t, t, class_embedding=self.frozen.embed_classes(probs))
        with torch.no_grad():
            true = self.frozen.noise_prediction(x_t, t, class_labels=target.long())
        return F.mse_loss(predicted.float(), true.float())

    def training_loss(self, batch: dict) -> torch.Tensor:
        p, x = self.params, batch["image"]
        n = len(x)
        if p.random_flip:
            flip = torch.rand(n, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn_like(x) if p.input == "xt" else None
        if p.lambda_flip > 0:  # the mirrored copy gets the mirrored noise: only the flip differs
            x_both = torch.cat([x, x.flip(-1)])
            noise = None if noise is None else torch.cat([noise, noise.flip(-1)])
        else:
            x_both = x
        all_logits = self.logits_with(self.head, x_both, noise)
        logits = all_logits[:n]
        loss = self.loss(logits, batch)
        parts = {"ce": loss.detach()}
        if p.lambda_flip > 0:
            flip_loss = (logits - all_logits[n:]).float().pow(2).sum(1).mean()
            loss = loss + p.lambda_flip * flip_loss
            parts["flip"] = flip_loss.detach()
        if p.lambda_cycle > 0:
            cycle = self.cycle_loss(x, logits, batch["target"])
            loss = loss + p.lambda_cycle * cycle
            parts["cycle"] = cycle.detach()
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=False, on_epoch=True, batch_size=n)
        return loss

    # --- EMA ---------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

        if self.ema_head is not None and any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            log.warning("train.ema_decay is set and D-Cube keeps its own EMA head (method.params.ema_decay): the "
                        "evaluated head is averaged twice; unset one of them")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA step of the head (parameters and float buffers) with warm-up for short runs."""
        if self.ema_head is None:
            return
        step = self.global_step
        decay = min(self.params.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.ema_head.parameters()), [q.detach() for q in self.head.parameters()],
                             1.0 - decay)
        for b_ema, b in zip(self.ema_head.buffers(), self.head.buffers()):
            if b.dtype.is_floating_point:
                b_ema.lerp_(b, 1.0 - decay)
            else:
                b_ema.copy_(b)


# ------------------------------------------------------------------ data helpers


def real_train_datamodule(dm):
    """The run's DataModule with real training images only and no augmentation (step 1 of the paper)."""
    from diffmed.data.dataset import DataModule

    train = dm.sets["train"]
    if train.synthetic is not None and train.synthetic.any():
        log.warning("the D-Cube generator trains on real images only: ignoring %d synthetic ones",
                    int(train.synthetic.sum()))
        train = train.subset(~train.synthetic)
    return DataModule({**dm.sets, "train": train}, dm.spec, dm.batch_size, dm.seed, None, dm.num_workers, False)


def analysis_images(dm, n: int, seed: int) -> torch.Tensor:
    """Up to ``n`` real training images (seeded choice, no augmentation), normalised, (n, C, H, W)."""
    train = dm.sets["train"]
    real = np.flatnonzero(~np.asarray(train.synthetic, bool)) if train.synthetic is not None else np.arange(len(train))
    pick = np.sort(np.random.default_rng(seed).permutation(real)[:n])
    ds = dm.dataset("train")
    return torch.stack([ds[int(i)]["image"] for i in pick])


def _splits_file(generator_run: Path) -> Path | None:
    for folder in (generator_run, generator_dir(generator_run).parent):
        if (folder / "splits.json").is_file():
            return folder / "splits.json"
    return None


def check_generator_split(generator_run: Path, run_dir: Path) -> None:
    """A given generator must not have trained on this run's validation or test images."""
    if not (generator_dir(generator_run) / "model.json").is_file():
        raise ConfigError(f"method.params.generator_run '{generator_run}' holds no trained generator "
                          f"({generator_dir(generator_run) / 'model.json'} missing)")
    theirs, ours = _splits_file(generator_run), run_dir / "splits.json"
    if theirs is None or not ours.is_file():
        log.warning("cannot check that generator_run '%s' never saw this run's val/test images (no splits.json)",
                    generator_run)
        return
    a, b = json.loads(theirs.read_text()), json.loads(ours.read_text())
    if Path(a.get("source", "")).resolve() != Path(b.get("source", "")).resolve():
        log.warning("generator_run '%s' was trained on %s, this run uses %s: split overlap not checked",
                    generator_run, a.get("source"), b.get("source"))
        return
    held_out = set(b["splits"]["val"]) | set(b["splits"]["test"])
    leaked = sorted(held_out & set(a["splits"]["train"]))
    if leaked:
        raise ConfigError(f"method.params.generator_run '{generator_run}' trained on {len(leaked)} of this run's "
                          f"validation/test images (e.g. {leaked[:3]}); train the generator with the same "
                          "data.split_seed and fractions as this run")
