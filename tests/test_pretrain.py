"""Latent DiT pre-training, weight transfer and the diffusion classifier (Zero) on tiny models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffmed.config import OptimConfig
from diffmed.data.dataset import DataModule
from diffmed.data.types import LabelledSet, TaskSpec
from diffmed.diffusion.dit import LatentDiT, dit_config, load_shared_weights, shared_state, to_class_conditional
from diffmed.diffusion.pretrain import PretrainParams, make_scheduler
from diffmed.diffusion.vae import (PixelSpace, VAECodec, build_codec, load_codec, reconstruction_metrics, save_codec,
                                   small_vae)
from diffmed.errors import ConfigError
from diffmed.methods.base import StageContext
from diffmed.methods.diffusion_classifier import (DiffusionClassifier, DiffusionParams, DiffusionScorer,
                                                  adaptive_relative_errors, make_plan, median_class_gap,
                                                  per_evaluation_relative, timestep_set)
from diffmed.methods.simclr import nt_xent

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
SPEC = TaskSpec(task="binary", class_names=["normal", "pneumonia"], channels=1, image_size=28)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised (adaLN-Zero) layers values so that conditioning can act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def real_images(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    if not NPZ.is_file():
        pytest.skip(f"{NPZ} not available")
    d = np.load(NPZ)
    return d["train_images"][:n, ..., None], d["train_labels"][:n, 0].astype(np.int64)


# ------------------------------------------------------------------------------------- VAE
def test_vae_round_trip_shapes_and_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    codec = VAECodec(small_vae(1, 28, downsample=2, width=8), 1).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 4, 14, 14) == (3, *codec.latent_shape(28))
    assert codec.decode(z).shape == x.shape
    save_codec(codec, tmp_path)
    again = load_codec(tmp_path).eval()
    assert torch.allclose(again.encode(x), z)
    scores = reconstruction_metrics(codec, [{"image": x}])
    assert np.isfinite(scores["psnr"]) and -1 <= scores["ssim"] <= 1


def test_codec_choice_and_grey_images_through_rgb_vae() -> None:
    assert isinstance(build_codec("auto", 1, 28), PixelSpace)
    assert isinstance(build_codec("auto", 1, 64), VAECodec)
    rgb = VAECodec(small_vae(3, 16, downsample=2, width=8), image_channels=1, source="pretrained:x").eval()
    x = torch.rand(2, 1, 16, 16)
    assert rgb.decode(rgb.encode(x)).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match="vae_downsample"):
        small_vae(1, 28, downsample=3)


# ------------------------------------------------------------------------------------- DiT
@pytest.mark.parametrize("mode", ["unconditional", "class", "representation"])
def test_dit_modes_shapes(mode: str) -> None:
    dit = LatentDiT(dit_config("tiny", 4, 8, mode, patch_size=2, num_classes=3))
    z = torch.randn(2, 4, 8, 8)
    out = dit(z, torch.tensor([10, 500]), y=torch.tensor([0, 2]), z0=z)
    assert out.shape == z.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained network predicts zero


def test_representation_and_class_change_the_output() -> None:
    z_t, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 700])
    rep = randomise(LatentDiT(dit_config("tiny", 1, 28, "representation")))
    assert rep.represent(z_t).shape == (2, rep.cfg.rep_dim)
    a, b = rep(z_t, t, z0=torch.randn(2, 1, 28, 28)), rep(z_t, t, z0=torch.randn(2, 1, 28, 28))
    assert not torch.allclose(a, b)
    cls = randomise(LatentDiT(dit_config("tiny", 1, 28, "class", num_classes=2)))
    y0, y1 = cls(z_t, t, y=torch.tensor([0, 0])), cls(z_t, t, y=torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    assert torch.allclose(cls(z_t, t), cls(z_t, t, y=torch.tensor([2, 2])))  # None = null class
    unc = randomise(LatentDiT(dit_config("tiny", 1, 28, "unconditional")))
    assert torch.allclose(unc(z_t, t, y=torch.tensor([0, 0])), unc(z_t, t, y=torch.tensor([1, 1])))


def test_weight_transfer_from_pretraining_to_tuning() -> None:
    pre = randomise(LatentDiT(dit_config("tiny", 1, 28, "representation")))
    tuned = to_class_conditional(pre, num_classes=3)
    assert tuned.cfg.mode == "class" and not hasattr(tuned, "encoder")
    src, dst = shared_state(pre), tuned.state_dict()
    assert src and all(torch.equal(v, dst[k]) for k, v in src.items())
    assert set(dst) - set(src) == {"y_embed.weight"}
    assert tuned.y_embed.weight.shape == (4, tuned.cfg.hidden) and 0 < tuned.y_embed.weight.std() < 0.05
    # from an unconditional pre-training, a zero label embedding reproduces the pre-trained network
    unc = randomise(LatentDiT(dit_config("tiny", 1, 28, "unconditional")))
    cls = to_class_conditional(unc, 2)
    nn.init.zeros_(cls.y_embed.weight)
    z, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    assert torch.allclose(cls(z, t, y=torch.tensor([0, 1])), unc(z, t), atol=1e-6)
    with pytest.raises(ConfigError, match="architecture"):
        load_shared_weights(unc, LatentDiT(dit_config("tiny", 1, 28, "class", patch_size=2, num_classes=2)))


# ------------------------------------------------------------------------------------- classifier
class SpyDiT(nn.Module):
    """Records every (z_t, t, y) row it is called with; predicts a class-dependent constant."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, z_t, t, y=None, z0=None, r=None):
        self.rows.append((z_t.clone(), t.clone(), y.clone()))
        return torch.zeros_like(z_t) + 0.1 * y.view(-1, 1, 1, 1)


def test_every_candidate_class_sees_identical_noise_and_timesteps() -> None:
    spy = SpyDiT()
    plan = make_plan([100, 500, 900], trials=2, num_classes=3, prune=False)
    scorer = DiffusionScorer(spy, make_scheduler(PretrainParams()).alphas_cumprod, plan, batch_size=7, seed=3)
    z0 = torch.randn(2, 1, 6, 6)
    scorer.relative_errors(z0, 3)
    z_t, t, y = (torch.cat(c) for c in zip(*spy.rows))
    assert len(y) == 2 * 3 * 6 == scorer.passes
    z_t, t, y = z_t.view(2, 3, 6, 1, 6, 6), t.view(2, 3, 6), y.view(2, 3, 6)
    assert torch.equal(y[:, :, 0], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    for c in (1, 2):
        assert torch.equal(z_t[:, c], z_t[:, 0]) and torch.equal(t[:, c], t[:, 0])
    assert torch.equal(t[0, 0], torch.tensor([100, 100, 500, 500, 900, 900]))
    assert not torch.equal(z_t[0, 0, 0], z_t[0, 0, 1])  # two trials at t=100 use different noise
    # the noise does not depend on the image: image 1 at t=900 = its own signal + the same bank entry
    spy.rows.clear()
    scorer.relative_errors(z0[1:], 3)
    assert torch.equal(torch.cat([r[0] for r in spy.rows]).view(1, 3, 6, 1, 6, 6), z_t[1:])
    # a plan swapped in after use (more draws per timestep) gets a noise bank of its own size
    spy.rows.clear()
    scorer.plan = make_plan([100, 500, 900], trials=4, num_classes=3, prune=False)
    scorer.relative_errors(z0[:1], 3)
    z_t4 = torch.cat([r[0] for r in spy.rows]).view(1, 3, 12, 1, 6, 6)
    assert len({tuple(z.flatten().tolist()) for z in z_t4[0, 0]}) == 12


def test_pruning_keeps_the_argmin_and_counts_passes() -> None:
    n, k = 5, 6
    g = torch.Generator().manual_seed(0)
    base = 1.0 + torch.rand(n, k, 8, generator=g)
    best = torch.tensor([2, 0, 5, 3, 3])
    base[torch.arange(n), best] = 0.5  # the true class has the lowest error at every evaluation
    calls: list[torch.Tensor] = []

    def error_fn(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
        calls.append(classes)
        return base.gather(1, classes[..., None].expand(-1, -1, 8))[..., evals]

    plan = make_plan(list(range(100, 900, 100)), 1, k, prune=True, prune_after=3, keep_top=2)
    assert len(plan.first) == 3 and len(plan.rest) == 5 and plan.passes(k) == 6 * 3 + 2 * 5
    rel = adaptive_relative_errors(error_fn, n, k, plan)
    assert torch.equal(rel.argmin(1), best)
    assert calls[1].shape == (n, 2) and (calls[1] == best[:, None]).any(1).all()
    full = adaptive_relative_errors(error_fn, n, k, make_plan(list(range(100, 900, 100)), 1, k, prune=False))
    assert torch.equal(full.argmin(1), best)


def test_a_single_surviving_class_ends_the_evaluation() -> None:
    plan = make_plan(list(range(100, 1000, 100)), 1, 2, prune=True, prune_after=2)
    assert len(plan.first) == 2 and len(plan.rest) == 0 and plan.passes(2) == 4  # of 18 without pruning
    errors = torch.tensor([[[1.0, 1.2], [1.1, 1.3]], [[0.9, 1.0], [0.5, 0.7]]])  # (image, class, evaluation)
    calls = []

    def error_fn(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
        calls.append(evals)
        return errors.gather(1, classes[..., None].expand(-1, -1, 2))[..., : len(evals)]

    rel = adaptive_relative_errors(error_fn, 2, 2, plan)
    assert len(calls) == 1 and torch.equal(rel.argmin(1), torch.tensor([0, 1]))


def test_per_timestep_comparison_gives_every_timestep_an_equal_say() -> None:
    # class 0 is 20% better at the two small timesteps; class 1 is 5% better at the large one, whose errors are
    # 100x larger: pooled errors follow the large timestep, per-timestep ratios the majority of timesteps
    errors = torch.tensor([[[0.8, 0.8, 105.0], [1.0, 1.0, 100.0]]])  # (image, class, evaluation)

    def error_fn(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
        return errors.gather(1, classes[..., None].expand(-1, -1, 3))[..., evals]

    plan = make_plan([10, 50, 900], 1, 2, prune=False)
    assert adaptive_relative_errors(error_fn, 1, 2, plan).argmin(1).item() == 1
    rel = adaptive_relative_errors(per_evaluation_relative(error_fn), 1, 2, plan)
    assert rel.argmin(1).item() == 0
    expected = torch.tensor([(0.8 / 0.9 * 2 + 105 / 102.5) / 3, (1 / 0.9 * 2 + 100 / 102.5) / 3])
    torch.testing.assert_close(rel[0], expected / expected.mean())


def test_temperature_fit_calibrates_the_error_logits() -> None:
    from diffmed.evaluation.metrics import fit_temperature

    g = torch.Generator().manual_seed(0)
    n, k = 400, 3
    y = torch.randint(0, k, (n,), generator=g)
    err = 1.0 + 0.02 * torch.randn(n, k, generator=g).abs()
    err[torch.arange(n), y] -= 0.01  # the true class is a little better on average
    rel = err / err.mean(1, keepdim=True)
    raw = torch.softmax(-rel, 1)
    assert raw.max() < 0.36  # the complaint: about 1/N per class
    logits = (-rel / median_class_gap(rel)).numpy()
    val, test = slice(0, 200), slice(200, None)
    temperature = fit_temperature(logits[val], y[val].numpy(), "multiclass")

    def nll(z: np.ndarray) -> float:
        return float(torch.nn.functional.cross_entropy(torch.from_numpy(z), y[test]))
    assert nll(logits[test] / temperature) < nll(logits[test]) and nll(logits[test] / temperature) < nll(-rel.numpy()[test])


def test_class_bias_undoes_a_scorer_that_favours_one_class_and_the_readout_keeps_old_models() -> None:
    g = torch.Generator().manual_seed(1)
    n = 600
    y = torch.randint(0, 2, (n,), generator=g)
    err = 1.0 + 0.02 * torch.randn(n, 2, generator=g)
    err[torch.arange(n), y] -= 0.05  # informative (the true class is better) ...
    err[:, 1] -= 0.15  # ... but class 1 reconstructs better for every image: argmin always says 1
    rel = err / err.mean(1, keepdim=True)
    assert (rel.argmin(1) == 1).float().mean() > 0.99
    method = tiny_classifier()
    logits = method.fit_readout(-rel, y)  # logits made with gain 1 and no bias, as a fresh model's
    assert float(method.logit_gain) == pytest.approx(1 / median_class_gap(rel))
    assert float(method.logit_bias[0]) > 0 > float(method.logit_bias[1]) and float(method.logit_bias.sum()) == 0
    acc = (logits.argmax(1) == y).float().mean()
    assert acc > 0.8 and (logits.argmax(1) == 0).any()
    torch.testing.assert_close(method.fit_readout(logits, y), logits)  # refitting its own output changes nothing
    without = tiny_classifier(class_bias=False)
    assert torch.equal(without.fit_readout(-rel, y).argmin(1), rel.argmax(1)) and not without.logit_bias.any()
    state = {k: v for k, v in method.state_dict().items() if k != "logit_bias"}  # saved before the bias existed
    fresh = tiny_classifier()
    fresh.load_state_dict(state)
    assert not fresh.logit_bias.any()


def tiny_classifier(**params) -> DiffusionClassifier:
    p = DiffusionParams(timesteps="strided", num_timesteps=4, eval_batch_size=16, **params)
    method = DiffusionClassifier(SPEC, p, OptimConfig(), 1)
    randomise(method.dit)
    return method.eval()


def test_predictions_are_deterministic_and_batch_independent() -> None:
    method = tiny_classifier()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    a = method.predict_logits(x)
    assert torch.equal(a, method.predict_logits(x))
    assert torch.allclose(a[2:4], method.predict_logits(x[2:4]), atol=1e-6)
    assert method.forward_passes_per_image() == 2 * 2  # binary: one survivor after half of the 4 evaluations ends it
    assert tiny_classifier(prune=False).forward_passes_per_image() == 2 * 4
    assert timestep_set("paper", 1000, 0) == list(range(100, 1000, 100))
    with pytest.raises(ConfigError, match="timesteps"):
        timestep_set([1000], 1000, 0)


def test_pretraining_stage_then_tuning_on_real_images(tmp_path: Path) -> None:
    images, labels = real_images(48)
    ds = LabelledSet(images=images, targets=labels, task="binary", class_names=SPEC.class_names,
                     ids=[str(i) for i in range(len(labels))])
    sets = {"train": ds.subset(np.arange(32)), "val": ds.subset(np.arange(32, 48)), "test": ds.subset(np.arange(32, 48))}
    dm = DataModule(sets, SPEC, batch_size=16, seed=0)
    from diffmed.config import TrainConfig
    from diffmed.engine.trainer import build_trainer

    cfg = TrainConfig(progress=False, deterministic=False)
    make = (lambda d, e, monitor=None, mode=None: build_trainer(cfg, d, max_epochs=e, monitor=monitor, mode=mode))
    method = DiffusionClassifier(SPEC, DiffusionParams(pretrain_epochs=1, timesteps=[200, 600]), OptimConfig(), 1)
    method.fit_stages(StageContext(dm, tmp_path, make, False))
    folder = tmp_path / "stages" / "pretrain" / "model"
    assert (folder / "dit.safetensors").is_file() and (tmp_path / "stages" / "pretrain" / "logs" / "metrics.csv").is_file()
    from diffmed.diffusion.pretrain import load_pretrained

    pre = load_pretrained(tmp_path)
    assert pre.dit.cfg.mode == "representation" and np.isfinite(pre.meta["final_loss"])
    shared = shared_state(pre.dit)
    assert all(torch.equal(v, method.dit.state_dict()[k]) for k, v in shared.items())
    batch = next(iter(dm.train_dataloader()))
    loss = method.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and method.dit.y_embed.weight.grad is not None
    # a second classifier reuses the finished stage instead of training again
    again = DiffusionClassifier(SPEC, DiffusionParams(pretrained_run=str(tmp_path), timesteps=[200, 600]), OptimConfig(), 1)
    again.fit_stages(StageContext(dm, tmp_path / "other", make, False))
    assert not (tmp_path / "other" / "stages").exists()
    with pytest.raises(ConfigError, match="autoencoder"):
        bad = DiffusionClassifier(SPEC, DiffusionParams(pretrained_run=str(tmp_path), autoencoder="vae",
                                                        vae_downsample=2, patch_size=2), OptimConfig(), 1)
        bad.fit_stages(StageContext(dm, tmp_path / "bad", make, False))


def test_nt_xent_prefers_matching_views() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16, generator=g)) < nt_xent(z, torch.randn(8, 16, generator=g))


def test_pruning_by_the_readout_keeps_the_classes_the_offsets_favour_and_no_pruned_class_wins() -> None:
    # the validation-fitted offsets say class 2 is reconstructed 0.3 worse for every image; on this image it looks
    # good in the first round (evaluations 0 and 5) and bad on the rest, and class 0 is the answer of a full evaluation
    errors = torch.tensor([[[1.0] * 6, [1.05] * 6, [1.2, 1.5, 1.5, 1.5, 1.5, 1.2]]])  # (image, class, evaluation)
    scored = []

    def error_fn(classes: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
        scored.append(classes)
        return errors.gather(1, classes[..., None].expand(-1, -1, 6))[..., evals]

    offsets = torch.tensor([0.0, 0.0, 0.3])
    readout = lambda rel: (rel - offsets).argmin(1).item()  # noqa: E731  (logits = -gain * (rel - offsets))
    timesteps = list(range(100, 700, 100))
    assert readout(adaptive_relative_errors(error_fn, 1, 3, make_plan(timesteps, 1, 3, prune=False))) == 0
    plan = make_plan(timesteps, 1, 3, prune=True, prune_after=2, keep_top=2)
    scored.clear()
    # by raw error: classes 0 and 1 are kept, and class 2 wins on its first round alone
    assert readout(adaptive_relative_errors(error_fn, 1, 3, plan)) == 2
    assert sorted(scored[1][0].tolist()) == [0, 1]
    scored.clear()
    # by the readout: class 2 is kept and scored to the end, class 1 is pruned, and the answer is the full one
    assert readout(adaptive_relative_errors(error_fn, 1, 3, plan, offsets=offsets)) == 0
    assert sorted(scored[1][0].tolist()) == [0, 2]
