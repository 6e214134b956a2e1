"""DiffMIC-v2: ROI crops, guidance map, heterologous noising, DDIM respacing, once-per-image features,
ablation graphs, seeded predictions, the DCG stage and the end-to-end paths (binary, multi-class, multi-label)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, tiny_overrides, load_benchmark
from diffmed.config import OptimConfig, TrainConfig, load_config
from diffmed.data.dataset import DataModule
from diffmed.data.types import LabelledSet, TaskSpec
from diffmed.engine.trainer import build_trainer
from diffmed.errors import ConfigError
from diffmed.evaluation.metrics import classification_metrics
from diffmed.methods.base import StageContext
from diffmed.methods.diffmic.dcg import crop_windows, top_k_boxes
from diffmed.methods.diffmic.method import DCG_WEIGHTS, VARIANTS, DiffMICv2
from diffmed.methods.registry import create_method

# small but real: the default CNNs, a tiny timm ViT for the raw image, a narrow UNet
FAST = {"image_backbone": "test_vit", "feature_dim": 32, "unet_channels": 16, "emb_dim": 32, "num_rois": 3,
        "attention_dim": 16, "num_points": 4}
BINARY = TaskSpec("binary", ["normal", "pneumonia"], 1, 28)
MULTILABEL = TaskSpec("multilabel", ["a", "b", "c"], 1, 28)


def make(spec: TaskSpec = BINARY, **params) -> DiffMICv2:
    torch.manual_seed(0)
    return create_method("diffmic_v2", spec, {**FAST, **params}, OptimConfig(lr=1e-3), 2)


def pneumonia(split: str, n: int) -> LabelledSet:
    with np.load(DATA / "pneumoniamnist.npz") as f:
        images, labels = f[f"{split}_images"][:n, :, :, None], f[f"{split}_labels"][:n, 0].astype(np.int64)
    return LabelledSet(images, labels, "binary", BINARY.class_names, [f"{split}{i}" for i in range(n)])


def multilabel(n: int, seed: int) -> LabelledSet:
    """Noise images whose three labels say which of three quadrants hold a bright square (learnable)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < 0.5).astype(np.float32)
    targets[:2] = [[1, 1, 1], [0, 0, 0]]  # every label has both values
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for j, (r, c) in enumerate([(2, 2), (2, 16), (16, 2)]):
        images[targets[:, j] == 1, r:r + 10, c:c + 10] = 230
    return LabelledSet(images, targets, "multilabel", MULTILABEL.class_names, [str(i) for i in range(n)],
                       mask=np.ones_like(targets))


def batch_of(ds: LabelledSet, spec: TaskSpec) -> dict:
    return next(iter(DataModule({"train": ds}, spec, len(ds), 0).eval_loader("train")))


def stage_context(tmp_path, sets: dict, spec: TaskSpec, resume: bool = False) -> StageContext:
    cfg = TrainConfig(accelerator="cpu", progress=False, limit_train_batches=2, batch_size=16)

    def make_trainer(stage_dir, max_epochs, monitor=None, mode=None):
        return build_trainer(cfg, stage_dir, max_epochs=max_epochs, monitor=monitor, mode=mode)

    return StageContext(DataModule(sets, spec, 16, 0), tmp_path, make_trainer, resume)


def count_calls(*modules: torch.nn.Module) -> list[int]:
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


# --- ROI crops -----------------------------------------------------------------------------------
def test_roi_crops_are_vectorised_all_channel_windows_at_the_top_k_cells():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 20, 20)
    scores = torch.randn(3, 4, 4)
    scores[0, 3, 3] = scores[1, 0, 0] = 10.0  # corner cells: their windows must be shifted inside the image
    boxes = top_k_boxes(scores, 5, (20, 20), 6)
    crops = crop_windows(images, boxes, 6)
    assert crops.shape == (3, 5, 3, 6, 6)
    top = scores.flatten(1).topk(5, dim=1).indices
    for b in range(3):
        for k in range(5):
            y, x = boxes[b, k].tolist()
            assert 0 <= y <= 14 and 0 <= x <= 14
            torch.testing.assert_close(crops[b, k], images[b, :, y:y + 6, x:x + 6])  # all channels
            row, col = divmod(top[b, k].item(), 4)
            cy, cx = (row + 0.5) * 5, (col + 0.5) * 5  # each cell is 5 px
            assert min(max(math.floor(cy - 3), 0), 14) == y and min(max(math.floor(cx - 3), 0), 14) == x
    assert boxes[0, 0].tolist() == [14, 14] and boxes[1, 0].tolist() == [0, 0]


def test_dcg_crops_all_channels_of_colour_images():
    m = make(TaskSpec("multiclass", list("abcde"), 3, 28))
    out = m.dcg(torch.randn(2, 3, 28, 28))
    assert out.rois.shape == (2, 3, 3, 8, 8) and out.local_logits.shape == (2, 5)
    assert not torch.equal(out.rois[:, :, 0], out.rois[:, :, 1])


# --- guidance map, noising, respacing --------------------------------------------------------------
def test_dense_guidance_map_interpolates_global_to_local_prior():
    m = make()
    m.eval()
    out = m.dcg(torch.randn(2, 1, 28, 28))
    y_g, y_l = out.global_logits.softmax(1), out.local_logits.softmax(1)
    M = m.guidance_map(out)
    assert M.shape == (2, 2, 4, 4)
    for i in range(4):
        torch.testing.assert_close(M[:, :, i, i], y_g)  # d = 0 on the diagonal
    torch.testing.assert_close(M[:, :, 0, 3], y_l)  # d = 1 at the far corners
    torch.testing.assert_close(M[:, :, 0, 1], (2 * y_g + y_l) / 3)  # d = 1/3
    torch.testing.assert_close(M, M.transpose(2, 3))


def test_heterologous_timesteps_per_point_vanilla_per_instance():
    full, c6 = make(), make(ablation="c6")
    t = full.train_timesteps(8, torch.device("cpu"))
    assert t.shape == (8, 4, 4) and (t.flatten(1).float().std(1) > 0).all() and t.min() >= 0 and t.max() < 1000
    t6 = c6.train_timesteps(8, torch.device("cpu"))
    assert (t6 == t6[:, :1, :1]).all() and t6.flatten().unique().numel() > 1


def test_point_timesteps_stay_in_their_band_unless_drawn_independently():
    torch.manual_seed(0)
    banded = make(point_timestep_band=0.05).train_timesteps(256, torch.device("cpu")).flatten(1)
    spread = banded.max(1).values - banded.min(1).values
    assert (spread <= 100).all() and (spread > 0).all() and banded.min() >= 0 and banded.max() <= 999
    assert banded.float().mean(1).std() > 200  # the instances' shared t still covers the chain
    free = make(point_timestep_band=None).train_timesteps(256, torch.device("cpu")).flatten(1)
    assert (free.max(1).values - free.min(1).values).float().mean() > 500  # the paper's independent draw


def test_per_point_noising_uses_each_points_own_timestep():
    m = make()
    z0 = torch.rand(2, 2, 4, 4)
    eps = torch.randn_like(z0)
    t = torch.randint(0, 1000, (2, 4, 4))
    noisy = m.add_noise(z0, eps, t)
    a = m.noise_schedule.alphas_cumprod[t][:, None]
    torch.testing.assert_close(noisy, a.sqrt() * z0 + (1 - a).sqrt() * eps)


def test_ddim_respacing_spreads_the_steps_over_the_chain():
    m = make()
    assert m.sampler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make(timestep_spacing="leading").sampler.timesteps.tolist() == list(range(900, -1, -100))  # Alg. 2
    seen = []
    m.denoiser.register_forward_hook(lambda mod, args, out: seen.append(args[3].unique().tolist()))
    m.eval().predict_logits(torch.randn(2, 1, 28, 28))
    assert seen == [[t] for t in range(999, 0, -100)]


def test_image_features_and_priors_are_computed_once_per_image():
    m = make(n_samples=3).eval()
    counts = count_calls(m.dcg.saliency, m.dcg.local_encoder, m.image_encoder, m.roi_encoder, m.denoiser)
    mean, std = m.predict_with_uncertainty(torch.randn(4, 1, 28, 28))
    assert counts == [1, 1, 1, 1, 10]  # 10 DDIM steps; the 3 chains of each image share one batch
    assert mean.shape == std.shape == (4, 2)
    assert m.forward_passes_per_image() == 4 + 10 * 3


def test_shared_encoders_build_f_from_the_frozen_dcg_in_two_encoder_passes():
    m = make(feature_encoders="dcg")
    assert not hasattr(m, "image_encoder") and not hasattr(m, "roi_encoder")
    counts = count_calls(m.dcg.saliency, m.dcg.local_encoder, m.denoiser)  # saliency: once per global pass
    m.eval().predict_with_uncertainty(torch.randn(4, 1, 28, 28))
    assert counts == [1, 1, 10] and m.forward_passes_per_image() == 2 + 10
    x = torch.randn(4, 1, 28, 28)
    out = m.dcg(x)
    raw, roi = m.image_proj(out.global_features), m.roi_proj(out.roi_features)
    expected = (m.fusion.t() * torch.cat([raw[:, None], roi], dim=1)).sum(1)
    torch.testing.assert_close(m.condition(x).features, expected)  # Eq. 6 over the DCG's own features
    m = make(feature_encoders="dcg", feature_loss_weight=0.5)  # the UNet's zero-initialised output passes no
    m.training_loss(batch_of(pneumonia("train", 8), BINARY)).backward()  # gradient at first; the CE on F does
    assert m.image_proj.weight.grad.abs().sum() > 0 and m.roi_proj.weight.grad.abs().sum() > 0 and m.fusion.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.dcg.parameters())  # the DCG stays frozen
    with pytest.raises(ConfigError, match="feature_encoders=dcg.*ablation=c3"):
        make(feature_encoders="dcg", ablation="c3")


# --- ablations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", list(VARIANTS))
def test_each_ablation_switch_builds_its_own_graph(ablation):
    m = make(ablation=ablation)
    v = VARIANTS[ablation]
    assert (m.dcg is not None) == v.needs_dcg and hasattr(m, "denoiser") == v.diffusion
    assert hasattr(m, "roi_encoder") == v.fused_features and hasattr(m, "head") == (not v.diffusion)
    if v.diffusion:
        assert m.denoiser.project.in_channels == 2 * (2 if v.prior else 1)  # [y_t, M] or y_t alone
    watched = [m.image_encoder] + ([m.dcg.saliency, m.dcg.local_encoder] if m.dcg else [])
    counts = count_calls(*watched)
    ds = pneumonia("train", 8)
    loss = m.training_loss(batch_of(ds, BINARY))
    assert torch.isfinite(loss)
    m.eval().predict_logits(torch.randn(2, 1, 28, 28))
    assert counts[0] == 2
    if m.dcg is not None:
        assert counts[1] == 2 and counts[2] == (2 if v.needs_local_prior else 0)
    if v.prior in ("global", "local"):
        out = m.dcg(torch.randn(2, 1, 28, 28), local=v.prior == "local", rois=False)
        prior = (out.global_logits if v.prior == "global" else out.local_logits).softmax(1)
        torch.testing.assert_close(m.guidance_map(out), prior[:, :, None, None].expand(-1, -1, 4, 4))
    expected = {"c1": 1, "c2": 11, "c3": 12, "c4": 13, "c5": 13, "c6": 14, "full": 14}[ablation]
    assert m.forward_passes_per_image() == expected


def test_c1_is_a_plain_classifier_trained_with_cross_entropy(tmp_path):
    m = make(ablation="c1")
    batch = batch_of(pneumonia("train", 8), BINARY)
    logits = m(batch["image"])
    torch.testing.assert_close(m.training_loss(batch), torch.nn.functional.cross_entropy(logits, batch["target"]))
    m.eval().plot_extras(batch["image"], batch["target"].tolist(), tmp_path)  # no trajectory to draw, no crash
    assert not list(tmp_path.iterdir())


# --- predictions -----------------------------------------------------------------------------------
def _trained_a_little(spec: TaskSpec, ds: LabelledSet, steps: int = 3, **params) -> DiffMICv2:
    m = make(spec, **params)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    batch = batch_of(ds, spec)
    m.train()
    for _ in range(steps):
        loss = m.training_loss(batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_same_seed_same_prediction_independent_of_the_batch():
    ds = pneumonia("train", 16)
    m = _trained_a_little(BINARY, ds, n_samples=2)
    x = batch_of(pneumonia("val", 6), BINARY)["image"]
    first = m.predict_logits(x)
    torch.testing.assert_close(m.predict_logits(x), first, rtol=0, atol=0)
    torch.testing.assert_close(m.predict_logits(x.flip(0)).flip(0), first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.predict_logits(x[2:3]), first[2:3], rtol=1e-5, atol=1e-5)
    m.params.seed = 1
    assert not torch.allclose(m.predict_logits(x), first)


def test_chain_noise_is_per_image_unless_shared():
    m = make(n_samples=2, start="per_image")
    x = batch_of(pneumonia("val", 3), BINARY)["image"]
    x = torch.cat([x, x[:1]])  # image 0 twice
    noise = m.chain_noise(x, (1, 2, 2, 4, 4))
    torch.testing.assert_close(noise[3], noise[0], rtol=0, atol=0)  # same image, same noise
    assert not torch.allclose(noise[1], noise[0]) and not torch.allclose(noise[1, :, 0], noise[1, :, 1])
    assert noise.std() == pytest.approx(1, abs=0.25)
    m.params.start = "shared"  # one draw for every image: the same shift in every prediction
    shared = m.chain_noise(x, (1, 2, 2, 4, 4))
    torch.testing.assert_close(shared[1], shared[0], rtol=0, atol=0)


def test_sample_prediction_starts_from_the_dcg_prior_and_trains():
    # zero-initialised output: the residual y_0 - M is predicted as 0, so the label vector read as is equals M
    m = make(prediction="sample", readout="clamped").eval()
    x = batch_of(pneumonia("val", 4), BINARY)["image"]
    prior = m.condition(x).prior.mean((2, 3))
    torch.testing.assert_close(m.sample(x)[:, 0], prior / prior.sum(1, keepdim=True))
    trained = _trained_a_little(BINARY, pneumonia("train", 16), prediction="sample")
    assert not torch.allclose(trained.sample(x)[:, 0], trained.condition(x).prior.mean((2, 3)), atol=1e-4)


def test_feature_loss_adds_cross_entropy_on_f_and_trains_the_head():
    batch = batch_of(pneumonia("train", 8), BINARY)
    assert not hasattr(make(), "head")  # off by default: no extra parameters
    aux = make(feature_loss_weight=0.5)
    torch.manual_seed(1)
    with_ce = aux.training_loss(batch)
    torch.manual_seed(1)  # same noise and timesteps: the difference is the weighted CE on F
    aux.params.feature_loss_weight = 0.0
    without = aux.training_loss(batch)
    ce = torch.nn.functional.cross_entropy(aux.head(aux.condition(batch["image"]).features), batch["target"])
    torch.testing.assert_close(with_ce - without, 0.5 * ce, rtol=1e-4, atol=1e-6)
    aux.params.feature_loss_weight = 0.5
    aux.training_loss(batch).backward()
    assert aux.head.weight.grad.abs().sum() > 0 and aux.image_proj.weight.grad.abs().sum() > 0


def test_prior_dropout_blanks_whole_maps_at_the_requested_rate():
    m = make(prior_dropout=0.5)
    x = batch_of(pneumonia("val", 32), BINARY)["image"]
    cond = m.condition(x)
    dropped = m.drop_prior(cond).prior
    blank = (dropped == 0.5).flatten(1).all(1)
    assert 4 < blank.sum() < 28  # about half the images, each map blanked whole
    torch.testing.assert_close(dropped[~blank], cond.prior[~blank])
    m.params.prior_dropout = 0.0
    assert m.drop_prior(cond) is cond


def test_logits_match_the_predicted_probabilities_and_spread():
    m = _trained_a_little(BINARY, pneumonia("train", 16), n_samples=4)
    x = torch.randn(3, 1, 28, 28)
    mean, std = m.predict_with_uncertainty(x)
    torch.testing.assert_close(mean.sum(1), torch.ones(3))
    torch.testing.assert_close(m.predict_logits(x).softmax(1), mean)
    assert (std > 0).all()
    one_chain, spread = m.predict_with_uncertainty(x, n_samples=1)
    assert (spread == 0).all() and one_chain.shape == (3, 2)


def test_logits_readout_keeps_the_ranking_the_clamp_ties():
    spec = TaskSpec("multiclass", ["a", "b", "c"], 1, 28)
    y0 = torch.tensor([[0.9, 0.2, -0.3], [0.7, 0.4, -0.1], [0.1, 1.0, 0.05]])
    clamped = make(spec, readout="clamped").readout(y0)
    assert clamped[0, 2] / clamped[0].sum() == clamped[1, 2] / clamped[1].sum()  # class c tied at the floor
    m = make(spec, readout="logits")
    probs = m.readout(y0)
    torch.testing.assert_close(probs, y0.softmax(1))
    assert probs[1, 2] > probs[0, 2]  # -0.1 ranks above -0.3
    assert (probs.argmax(1) == clamped.argmax(1)).all()
    labels = make(MULTILABEL, readout="logits").readout(y0)
    torch.testing.assert_close(labels, torch.sigmoid(y0 - 0.5))
    x = batch_of(pneumonia("val", 4), BINARY)["image"]
    binary = _trained_a_little(BINARY, pneumonia("train", 16), readout="logits", n_samples=2)
    mean, _ = binary.predict_with_uncertainty(x)
    torch.testing.assert_close(binary.predict_logits(x).softmax(1), mean)


def test_multilabel_targets_are_label_vectors_and_logits_are_per_label():
    ds = multilabel(16, 0)
    m = _trained_a_little(MULTILABEL, ds)
    batch = batch_of(ds, MULTILABEL)
    y0, weight = m.label_targets(batch)
    torch.testing.assert_close(y0, torch.as_tensor(ds.targets))  # 0/1 vector, not one_hot
    mean, _ = m.predict_with_uncertainty(batch["image"])
    torch.testing.assert_close(torch.sigmoid(m.predict_logits(batch["image"])), mean, rtol=1e-4, atol=1e-5)
    masked = {**batch, "mask": batch["mask"].clone()}
    masked["mask"][:, 1] = 0  # an entry masked out by a label policy adds nothing to the loss
    masked["target"] = batch["target"].clone()
    masked["target"][:, 1] = float("nan")
    assert torch.isfinite(m.training_loss(masked))


def test_multiclass_colour_images_train_and_predict():
    with np.load(DATA / "retinamnist.npz") as f:
        images, labels = f["train_images"][:10], f["train_labels"][:10, 0].astype(np.int64)
    spec = TaskSpec("multiclass", [str(i) for i in range(5)], 3, 28)
    ds = LabelledSet(images, labels, "multiclass", spec.class_names, [str(i) for i in range(10)])
    m = _trained_a_little(spec, ds, steps=2)
    logits = m.predict_logits(batch_of(ds, spec)["image"])
    assert logits.shape == (10, 5) and torch.isfinite(logits).all()


# --- stages and end to end -------------------------------------------------------------------------
def test_dcg_stage_trains_saves_freezes_and_is_reused(tmp_path):
    sets = {"train": pneumonia("train", 32), "val": pneumonia("val", 24)}
    m = make(dcg_epochs=1)
    before = {k: v.clone() for k, v in m.dcg.state_dict().items()}
    m.fit_stages(stage_context(tmp_path, sets, BINARY))
    weights = tmp_path / "stages" / "dcg" / DCG_WEIGHTS
    assert weights.is_file() and (tmp_path / "stages" / "dcg" / "checkpoints" / "best.ckpt").is_file()
    after = m.dcg.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    bn = "global_encoder.bn1.running_mean"
    assert not torch.equal(before[bn], after[bn])  # the stage trained the DCG in train mode (batch-norm stats)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not any(p.requires_grad for p in m.dcg.parameters())
    m.train()
    assert not m.dcg.training and m.image_encoder.training  # frozen DCG keeps its batch-norm statistics

    def refuse(*_, **__):
        raise AssertionError("a finished DCG stage must not be trained again")

    again = make(dcg_epochs=1)
    again.fit_stages(StageContext(None, tmp_path, refuse, True))
    for k, v in again.dcg.state_dict().items():
        torch.testing.assert_close(v, after[k])

    weights.unlink()  # killed after its last checkpoint: a resumed stage continues it instead of restarting
    resumed = make(dcg_epochs=1)
    with torch.no_grad():  # a different start: only the resumed checkpoint can bring back the stage's weights
        for p in resumed.dcg.parameters():
            p.add_(0.1)
    resumed.fit_stages(stage_context(tmp_path, sets, BINARY, resume=True))
    for k, v in resumed.dcg.state_dict().items():
        torch.testing.assert_close(v, after[k])
    assert weights.is_file()

    trainer = stage_context(tmp_path / "main", sets, BINARY).make_trainer(tmp_path / "main", 1)
    trainer.fit(again, datamodule=DataModule(sets, BINARY, 16, 0))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert "val/auc" in trainer.callback_metrics
    for k, v in again.dcg.state_dict().items():  # the main fit leaves the DCG as the stage left it
        torch.testing.assert_close(v, after[k])


def test_multilabel_end_to_end_with_per_label_auroc(tmp_path):
    sets = {"train": multilabel(48, 0), "val": multilabel(24, 1), "test": multilabel(24, 2)}
    m = make(MULTILABEL, dcg_epochs=1)
    ctx = stage_context(tmp_path, sets, MULTILABEL)
    m.fit_stages(ctx)
    trainer = ctx.make_trainer(tmp_path / "main", 2)
    trainer.fit(m, datamodule=ctx.datamodule)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    m.eval()
    batch = batch_of(sets["test"], MULTILABEL)
    probs = torch.sigmoid(m.predict_logits(batch["image"])).numpy()
    metrics = classification_metrics("multilabel", sets["test"].targets, probs, mask=sets["test"].mask)
    assert len(metrics["per_class"]["auc"]) == 3 and all(np.isfinite(metrics["per_class"]["auc"]))


@pytest.mark.slow
def test_engine_run_trains_the_dcg_stage_and_reloads(tmp_path, tiny_pneumonia):
    from diffmed.engine.run import load_trained, train

    params = {f"method.params.{k}": v for k, v in {**FAST, "dcg_epochs": 1}.items()}
    overrides = tiny_overrides(tiny_pneumonia, **{"method.name": "diffmic_v2", "train.max_epochs": 1, **params})
    cfg = load_config(None, [o for o in overrides if not o.startswith("method.params.backbone=")])
    run_dir = train(cfg, tmp_path / "run")
    assert (run_dir / "stages" / "dcg" / DCG_WEIGHTS).is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "plots" / "diffmic_trajectory.png").is_file()
    assert '<section id="trajectory">' in (run_dir / "report.html").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cost = metrics["cost"]
    assert cost["stage_seconds"] > 0 and cost["train_seconds"] > 0  # the DCG stage's time is reported apart
    recorded = json.loads((run_dir / "stages" / "seconds.json").read_text())["seconds"]
    assert recorded == pytest.approx(cost["stage_seconds"])  # a later process adds to it, not restarts from 0
    method, meta, _ = load_trained(run_dir)
    x = torch.randn(3, 1, 28, 28)
    again, _, _ = load_trained(run_dir)
    torch.testing.assert_close(method.predict_logits(x), again.predict_logits(x))
    model_json = run_dir / "model" / "model.json"  # a model saved before the readout option keeps its own
    saved = json.loads(model_json.read_text())
    del saved["params"]["readout"]
    model_json.write_text(json.dumps(saved))
    assert load_trained(run_dir)[0].params.readout == "clamped"
    model_json.write_text(json.dumps(meta))
    swept = load_benchmark("diffmic").sweep_run(run_dir)  # re-read under other inference settings
    default = swept["shared noise, 1 chain, 10 steps (default)"]["test"]
    assert default["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)  # the default setting is the run itself
    assert len(swept) == 6 and swept["per-image noise, 1 chain, 10 steps"]["test"] != default
    assert swept["DCG prior M alone"].keys() == {"train", "val", "test"}
    readouts = load_benchmark("diffmic_readout").compare(run_dir, n_boot=50)["readouts"]
    assert readouts["logits"]["test"]["auc"] == pytest.approx(metrics["test"]["auc"])  # the run's own readout
    assert readouts["logits"]["test"]["acc"] == readouts["clamped"]["test"]["acc"]  # same argmax
    assert (run_dir / "readouts" / "logits" / "predictions.csv").is_file()
    cache = run_dir / "sweep.json"  # a cache from before the training-split check gains only that split
    old = json.loads(cache.read_text())
    del old["DCG prior M alone"]["train"]
    cache.write_text(json.dumps(old))
    assert load_benchmark("diffmic").sweep_run(run_dir) == swept


# --- configuration errors ----------------------------------------------------------------------------
def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="num_rois"):
        make(num_rois=17)  # resnet18 at 28 px: a 4x4 saliency map
    with pytest.raises(ConfigError, match="roi_size"):
        make(roi_size=40)
    with pytest.raises(ConfigError, match="local_backbone='test_convnext' cannot encode 8 px"):
        make(local_backbone="test_convnext")
    with pytest.raises(ConfigError, match="roi_backbone='test_convnext' cannot encode 8 px"):
        make(roi_backbone="test_convnext")
    with pytest.raises(ConfigError, match="inference_steps"):
        make(inference_steps=2000)
    with pytest.raises(ConfigError, match="ablation"):
        make(ablation="c7")
    with pytest.raises(ConfigError, match="uncertain_policy"):
        make(TaskSpec("multilabel", ["a", "b"], 1, 28, three_way_columns=[0]))


def test_ablation_rows_with_a_dcg_reuse_the_full_runs_stage(tmp_path):
    import argparse

    bench = load_benchmark("diffmic")
    args = argparse.Namespace(work=tmp_path)
    source = bench.run_dir_of(args, "pneumoniamnist", "full", 8, 0) / "stages" / "dcg" / DCG_WEIGHTS
    bench.share_dcg_stage(args, "pneumoniamnist", "c3", 8, 0)  # nothing to share yet: c3 will train its own
    assert not (bench.run_dir_of(args, "pneumoniamnist", "c3", 8, 0) / "stages").exists()
    source.parent.mkdir(parents=True)
    source.write_bytes(b"weights")
    for tag in ("c1", "c2", "c3", "c4", "c5", "c6"):
        bench.share_dcg_stage(args, "pneumoniamnist", tag, 8, 0)
        copied = bench.run_dir_of(args, "pneumoniamnist", tag, 8, 0) / "stages" / "dcg" / DCG_WEIGHTS
        assert copied.is_file() == VARIANTS[tag].needs_dcg
    assert not (bench.run_dir_of(args, "pneumoniamnist", "c3", 8, 1) / "stages").exists()  # per seed


def test_cost_benchmark_times_every_component():
    cost = load_benchmark("diffmic_cost")
    m = make().eval()
    parts = cost.components(m, torch.randn(4, 1, 28, 28))
    assert len(parts) == 6 and any(name.startswith("label UNet x 10") for name in parts)
    assert all(cost.ms_per_image(fn, 4, 0.01) > 0 for fn in parts.values())
    shared = cost.components(make(feature_encoders="dcg").eval(), torch.randn(4, 1, 28, 28))
    assert len(shared) == 5 and "F: projections of the DCG features" in shared
    assert all(cost.ms_per_image(fn, 4, 0.01) > 0 for fn in shared.values())


def test_local_pretrained_weights_reach_only_the_encoders_named(tmp_path):
    from safetensors.torch import save_file

    donor = make()
    save_file({k: v.contiguous() for k, v in donor.dcg.global_encoder.state_dict().items()},
              str(tmp_path / "global.safetensors"))
    torch.manual_seed(1)  # another initialisation than the donor's
    model = create_method("diffmic_v2", BINARY, {**FAST, "pretrained": {"global": str(tmp_path / "global.safetensors")}},
                          OptimConfig(lr=1e-3), 2)
    for name, weight in donor.dcg.global_encoder.state_dict().items():
        torch.testing.assert_close(model.dcg.global_encoder.state_dict()[name], weight)
    assert not torch.equal(model.dcg.local_encoder.conv1[0].weight, donor.dcg.local_encoder.conv1[0].weight)
    with pytest.raises(ConfigError, match="not found"):
        make(pretrained={"roi": str(tmp_path / "missing.safetensors")})
    with pytest.raises(Exception, match="backbone"):
        make(pretrained={"backbone": "x.safetensors"})  # not an encoder of the method
