"""The class-conditional diffusion model: schedules, backbones, L_Gen, EMA, guidance and sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmed.data.types import TaskSpec
from diffmed.diffusion.backbones import (MIDDLE, build_backbone, capture_block_outputs, capturing,
                                         middle_features, pool_features)
from diffmed.diffusion.generative import ClassConditionalDiffusion, contrastive_loss, pair_distance, parse_params
from diffmed.diffusion.sampling import sample
from diffmed.diffusion.schedule import sampling_scheduler, training_scheduler, training_target
from diffmed.errors import ConfigError

SPEC = TaskSpec(task="binary", class_names=["normal", "pneumonia"], channels=1, image_size=28)


@pytest.fixture(scope="module")
def real_batch(shared_data):
    """32 real PneumoniaMNIST training images in [-1, 1] (the engine's mean = std = 0.5) and labels."""
    with np.load(shared_data / "pneumoniamnist.npz") as z:
        images, labels = z["train_images"][:32], z["train_labels"][:32, 0]
    x = torch.from_numpy(images).float().div(255.0)[:, None] * 2 - 1
    y = torch.from_numpy(labels.astype(np.int64))
    assert 0 < int(y.sum()) < len(y)  # both classes present
    return x, y


def tiny(backbone: str = "unet", **params) -> ClassConditionalDiffusion:
    torch.manual_seed(0)
    return ClassConditionalDiffusion(SPEC, {"backbone": backbone, "size": "tiny", **params})


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm"])
@pytest.mark.parametrize("steps", [10, 50])
def test_respaced_timesteps_are_evenly_spread_over_the_whole_chain(sampler, steps):
    ts = sampling_scheduler(sampler, steps).timesteps.numpy()
    stride = 1000 // steps
    assert len(ts) == steps
    assert ts[0] == 999 and ts[-1] == stride - 1  # starts from pure noise, ends next to the clean image
    assert (np.diff(ts) == -stride).all()  # evenly spread -- not the last `steps` timesteps of the chain


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_first_step_keeps_a_wrong_x0_estimate_in_the_data_range(sampler):
    """At t = 999 a slightly wrong noise estimate implies |x0| ~ 80; the step must clip it to [-1, 1]."""
    sched = sampling_scheduler(sampler, 10)
    x, eps = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    prev = sched.step(eps, sched.timesteps[0], x).prev_sample
    a_prev = sched.alphas_cumprod[sched.timesteps[1]]
    bound = a_prev.sqrt() + 0.5 * (1 - a_prev).sqrt()  # DDIM: sqrt(a') * x0 + sqrt(1 - a') * eps with |x0| <= 1
    assert prev.abs().max() <= bound + 1e-5

def test_beta_schedules_and_velocity_target():
    lin, cos = training_scheduler("linear"), training_scheduler("cosine", "v_prediction")
    assert not torch.allclose(lin.alphas_cumprod, cos.alphas_cumprod)
    x0, eps, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999])
    a = cos.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(training_target(cos, x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.equal(training_target(lin, x0, eps, t), eps)
    with pytest.raises(ConfigError, match="sampler"):
        sampling_scheduler("euler", 10)


def test_params_reject_unknown_keys():
    with pytest.raises(ConfigError, match="margn"):
        parse_params({"margn": 0.5})


# ------------------------------------------------------------------ backbones


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_tiny_backbones_train_on_real_images_without_nan(backbone, real_batch):
    x, y = real_batch
    model = tiny(backbone, warmup_steps=0, lr=1e-3)
    opt = model.configure_optimizers()["optimizer"]
    before = [p.detach().clone() for p in model.backbone.parameters()]
    for _ in range(3):
        loss, parts = model.generative_loss(x, y)
        assert torch.isfinite(loss) and {"diff", "cont"} <= set(parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema()
    assert all(torch.isfinite(p).all() for p in model.backbone.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters()))
    # the EMA copy moved, but lags behind the trained weights
    ema = list(model.ema_backbone.parameters())
    assert any(not torch.equal(b, e) for b, e in zip(before, ema))
    assert any(not torch.equal(e, p) for e, p in zip(ema, model.backbone.parameters()))


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_capture_block_outputs_returns_every_block(backbone):
    torch.manual_seed(0)
    net = build_backbone(backbone, 3, 3, 30, "tiny" if backbone == "uvit" else "small")  # 30 px: padded inside
    x, t = torch.randn(2, 3, 30, 30), torch.tensor([5, 700])
    feats = capture_block_outputs(net, x, t, torch.tensor([0, 2]))
    names = [n for n, _ in net.named_blocks()]
    assert list(feats) == names and MIDDLE in names
    assert net(x, t, torch.tensor([0, 2])).shape == x.shape  # prediction cropped back to 30 px
    if backbone == "unet":
        widths, levels, side = net.unet.config.block_out_channels, len(names) // 2, net.padded_size
        assert side == 32 and names[:levels] == [f"down_blocks.{i}" for i in range(levels)]
        for i in range(levels):
            down = side >> min(i + 1, levels - 1)
            assert feats[f"down_blocks.{i}"].shape == (2, widths[i], down, down)
            up = side >> max(levels - 2 - i, 0) if i < levels - 1 else side
            assert feats[f"up_blocks.{i}"].shape == (2, widths[levels - 1 - i], up, up)
        assert feats[MIDDLE].shape == (2, widths[-1], side >> (levels - 1), side >> (levels - 1))
    else:
        grid = net.grid
        assert names == ["in_blocks.0", "mid_block", "out_blocks.0"]
        assert all(f.shape == (2, net.dim, grid, grid) for f in feats.values())
    ran = []
    handle = dict(net.named_blocks())[names[-1]].register_forward_hook(lambda *_: ran.append(1))
    mid = middle_features(net, x, t)  # stops after the middle block: the last block never runs
    handle.remove()
    assert mid.shape == (2, feats[MIDDLE].shape[1]) and not ran
    assert torch.allclose(mid, pool_features(capture_block_outputs(net, x, t)[MIDDLE]), atol=1e-6)
    with pytest.raises(ConfigError, match="unknown block"):
        capture_block_outputs(net, x, t, names=["nope"])


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_soft_class_embedding_passes_gradients_to_probabilities(backbone):
    net = tiny(backbone).backbone
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([10, 200, 400, 900])
    logits = torch.randn(4, 2, requires_grad=True)
    out = net(x, t, class_embedding=net.embed_classes(logits.softmax(dim=1)))
    out.pow(2).mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    labels = torch.tensor([0, 1, 1, 0])
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    with torch.no_grad():
        assert torch.allclose(net(x, t, class_embedding=net.embed_classes(one_hot)), net(x, t, labels), atol=1e-5)


# ------------------------------------------------------------------ L_Gen


def test_contrastive_term_alone_trains_the_backbone(real_batch):
    x, y = real_batch
    net = tiny().backbone
    t = torch.full((16,), 300)
    with capturing(net, [MIDDLE]) as feats:
        net(x[:16], t, y[:16])
        mid_a = pool_features(feats[MIDDLE])
        net(x[16:], t, y[16:])
        mid_b = pool_features(feats[MIDDLE])
    cont, _ = contrastive_loss(mid_a, mid_b, y[:16] == y[16:], margin=1.0)
    cont.backward()
    first = net.unet.conv_in.weight  # upstream of the middle block
    assert cont > 0 and first.grad is not None and first.grad.abs().sum() > 0


def _grads(model, x, y) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(1)
    model.generative_loss(x, y)[0].backward()
    return model.backbone.unet.conv_in.weight.grad.clone()


def test_use_contrastive_flag_adds_and_removes_the_term(real_batch):
    x, y = real_batch
    on, weightless = tiny(lambda_cont=1.0), tiny(lambda_cont=0.0)
    assert not torch.allclose(_grads(on, x, y), _grads(weightless, x, y))  # L_Cont reaches the backbone
    off_a, off_b = tiny(use_contrastive=False, lambda_cont=1.0), tiny(use_contrastive=False, lambda_cont=50.0)
    assert torch.equal(_grads(off_a, x, y), _grads(off_b, x, y))  # the ablation has no contrastive term
    torch.manual_seed(1)
    assert "cont" not in off_a.generative_loss(x, y)[1]
    null_on, null_weightless = tiny(contrast_on="null"), tiny(contrast_on="null", lambda_cont=0.0)
    null_grad = _grads(null_on, x, y)
    assert not torch.allclose(null_grad, _grads(null_weightless, x, y))
    assert not torch.allclose(null_grad, _grads(on, x, y))  # features of the null-class pass, not the labelled one


def test_margin_hinge_is_active_at_init_on_a_real_batch(real_batch):
    """With L2-normalised features some different-class pairs lie inside the default margin at init
    (the public code's margin of 0.1 on raw features never is)."""
    x, y = real_batch
    torch.manual_seed(0)
    model = ClassConditionalDiffusion(SPEC, {})  # the default (small) UNet
    torch.manual_seed(2)
    with torch.no_grad():
        _, parts = model.generative_loss(x, y)
    assert 0 < parts["hinge_active"] <= 1 and parts["cont"] > 0
    t = torch.randint(0, 1000, (16,))
    with torch.no_grad():
        feats = middle_features(model.backbone, x[:16], t, y[:16])
        other = middle_features(model.backbone, x[16:], t, y[16:])
    raw = (feats - other).norm(dim=1)
    assert (raw > 0.1).all()  # why the raw-distance hinge is dead
    d = pair_distance(feats, other)
    assert ((d >= 0) & (d <= 2)).all()


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm"])
def test_sampling_shapes_and_seeded_determinism(sampler):
    model = tiny().eval()
    labels = torch.tensor([0, 1, 1])

    def run(seed: int, **kw) -> torch.Tensor:
        return sample(model, labels, generator=torch.Generator().manual_seed(seed), steps=4, sampler=sampler,
                      batch_size=2, **kw)

    a = run(0)
    assert a.shape == (3, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))


def test_per_image_generators_make_images_independent_of_the_batch():
    model = tiny("uvit").eval()
    both = sample(model, torch.tensor([0, 1]), generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                  steps=3, sampler="ddpm")
    alone = sample(model, torch.tensor([1]), generator=[torch.Generator().manual_seed(6)], steps=3, sampler="ddpm")
    assert torch.allclose(both[1:], alone, atol=1e-5)


def test_classifier_free_guidance_runs_cond_and_null_in_one_batch():
    model = tiny().eval()
    net = model.sampling_network
    seen: list[torch.Tensor] = []
    original = net.forward
    net.forward = lambda x, t, labels=None, emb=None: (seen.append(labels.clone()), original(x, t, labels, emb))[1]
    try:
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        plain = sample(model, torch.tensor([0, 1]), generator=gen(), steps=3)
        assert all(len(s) == 2 and model.null_class not in s for s in seen)
        seen.clear()
        guided = sample(model, torch.tensor([0, 1]), generator=gen(), steps=3, guidance_scale=3.0)
    finally:
        net.forward = original
    assert len(seen) == 3 and all(s.tolist() == [0, 1, model.null_class, model.null_class] for s in seen)
    assert not torch.allclose(plain, guided)


def test_sampling_rejects_bad_requests():
    model = tiny()
    with pytest.raises(ConfigError, match="labels"):
        sample(model, torch.tensor([3]), generator=torch.Generator())
    with pytest.raises(ConfigError, match="eta"):
        sample(model, torch.tensor([0]), generator=torch.Generator(), sampler="dpm", eta=0.5)
