"""D-Cube: hyper-feature hooks, KS Gaussianity selection, head and losses, determinism, the engine run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import load_benchmark, tiny_overrides
from diffmed.config import OptimConfig, load_config
from diffmed.data.types import TaskSpec
from diffmed.diffusion.generative import ClassConditionalDiffusion, GenerativeParams
from diffmed.errors import ConfigError
from diffmed.methods import create_method, method_params
from diffmed.methods.dcube import (TABLE_IV, TABLE_VI, TABLE_VII, FrozenDiffusion, GaussianityAnalysis,
                                   analyze_gaussianity, feature_shapes, layer_gaussianity, read_selection,
                                   select_layers, write_analysis)
from diffmed.methods.dcube.head import resize_map
from diffmed.methods.dcube.method import check_generator_split

SPEC = TaskSpec(task="binary", class_names=["normal", "pneumonia"], channels=1, image_size=28)
TINY_GEN = {"backbone": "uvit", "size": "tiny", "sample_every_n_epochs": None, "max_epochs": 1}


@pytest.fixture(scope="module")
def real_batch(shared_data):
    """16 real PneumoniaMNIST training images in the engine's [-1, 1] scale, and their labels."""
    with np.load(shared_data / "pneumoniamnist.npz") as z:
        images, labels = z["train_images"][:16], z["train_labels"][:16, 0]
    return torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None], torch.from_numpy(labels.astype(np.int64))


def tiny_method(layers=("in_blocks.0", "mid_block"), **params):
    """A D-Cube method on an untrained tiny U-ViT with its head already built (layers given)."""
    torch.manual_seed(0)
    p = {"generator": {"size": "tiny"}, "selected_layers": list(layers), "subfeatures": "resnet18", **params}
    return create_method("dcube", SPEC, p, OptimConfig(lr=1e-3), max_epochs=1)


# ------------------------------------------------------------------ hyper-features


@pytest.mark.parametrize("backbone,size,side", [("unet", "small", 30), ("uvit", "tiny", 28)])
def test_hooks_return_every_block_in_one_forward_pass(backbone, size, side, real_batch):
    torch.manual_seed(0)
    frozen = FrozenDiffusion.build(GenerativeParams(backbone=backbone, size=size), 2, 1, side)
    x = torch.nn.functional.interpolate(real_batch[0][:4], size=side, mode="bilinear")
    calls = []
    handle = frozen.net.register_forward_pre_hook(lambda *_: calls.append(1))
    feats = frozen.features(x, 100)
    handle.remove()
    assert len(calls) == 1 and list(feats) == frozen.block_names()
    shapes = feature_shapes(frozen, frozen.block_names(), 1, side)
    for name, f in feats.items():
        assert f.shape == (4, *shapes[name]) and torch.isfinite(f).all()
    if backbone == "uvit":
        assert all(f.shape == (4, frozen.net.dim, 14, 14) for f in feats.values())
    else:  # 30 px is padded to 32 inside; down/up blocks change resolution and width
        assert {f.shape[-1] for f in feats.values()} == {32, 16, 8} and frozen.crop_side(32) == 30
        assert len({f.shape[1] for f in feats.values()}) > 1
    # batched extraction equals per-image extraction: features do not depend on the batch (up to float32 rounding
    # of batched vs single convolutions, about 1e-5 on activations of size 5 here; a real dependence is far larger)
    one = frozen.features(x[2:3], 100)
    assert all(torch.allclose(feats[n][2:3], one[n], rtol=1e-4, atol=1e-4) for n in feats)
    first = frozen.block_names()[:1]  # asking for early blocks only stops the pass early, same values
    assert torch.allclose(frozen.features(x, 100, first)[first[0]], feats[first[0]])
    assert not any(p.requires_grad for p in frozen.parameters())


def test_frozen_model_stays_in_eval_mode_and_rejects_bad_layers():
    frozen = FrozenDiffusion.build(GenerativeParams(backbone="uvit", size="tiny"), 2, 1, 28)
    frozen.train()
    assert not frozen.training and not frozen.net.training
    with pytest.raises(ConfigError, match="method.params.layers"):
        frozen.check_layers(["nope"])
    with pytest.raises(ConfigError, match="timestep"):
        frozen.check_timestep(1000)


# ------------------------------------------------------------------ Gaussianity


def synthetic_maps(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Feature maps from N(0,1), N(1, 3^2), an exponential and a bimodal mixture: one map per layer shared
    by the images (as image structure is) plus a little per-image Gaussian jitter."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 8, 8)
    bimodal = torch.randn(shape, generator=g) * 0.3 + torch.where(torch.rand(shape, generator=g) < 0.5, -2.0, 2.0)
    base = {"gauss": torch.randn(shape, generator=g), "exponential": -torch.rand(shape, generator=g).log(),
            "gauss_shifted": 1.0 + 3.0 * torch.randn(shape, generator=g), "bimodal": bimodal}
    return {k: v + 0.05 * v.std() * torch.randn((n, *shape[1:]), generator=g) for k, v in base.items()}


@pytest.mark.parametrize("reduce", ["pvalue", "feature"])
def test_ks_selects_the_non_gaussian_layers(reduce):
    maps = synthetic_maps()
    table = layer_gaussianity(maps, reduce, max_values=512)
    assert table["gauss"][1] > 0.05 and table["gauss_shifted"][1] > 0.05
    assert table["exponential"][1] < 1e-3 and table["bimodal"][1] < 1e-3
    layers = list(maps)
    analysis = GaussianityAnalysis(layers, [100], np.array([[table[n][1]] for n in layers]),
                                   np.array([[table[n][0]] for n in layers]), 8)
    sel = select_layers(analysis, 100, alpha=0.05)
    assert set(sel.best) == {"exponential", "bimodal"} and set(sel.worst) == {"gauss", "gauss_shifted"}
    assert sel.ranking[-2:] != sel.best and set(sel.ranking[:2]) == {"exponential", "bimodal"}
    top = select_layers(analysis, 100, top_k=1)
    assert len(top.best) == 1 and top.best[0] in {"exponential", "bimodal"} and len(top.worst) == 1
    with pytest.raises(ConfigError, match="ks_top_k"):
        select_layers(analysis, 100, top_k=9)


def test_analysis_of_a_generator_finds_a_non_gaussian_block(tmp_path, real_batch):
    """Make one block's output exponential and another's Gaussian: the analysis must rank them so."""
    torch.manual_seed(0)
    gen = ClassConditionalDiffusion(SPEC, {"backbone": "unet", "size": "tiny"}, with_ema=False)
    blocks = dict(gen.backbone.named_blocks())

    def replace(kind):
        def hook(_m, _i, out):
            g = torch.Generator().manual_seed(1)
            h = out[0] if isinstance(out, tuple) else out
            new = -torch.rand(h.shape, generator=g).log() if kind == "exp" else torch.randn(h.shape, generator=g)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    handles = [blocks["mid_block"].register_forward_hook(replace("exp")),
               blocks["up_blocks.1"].register_forward_hook(replace("gauss"))]
    try:
        analysis = analyze_gaussianity(gen, real_batch[0], timesteps=[0, 100], batch_size=8, max_values=512)
    finally:
        for h in handles:
            h.remove()
    assert analysis.layers == [n for n, _ in gen.backbone.named_blocks()] and analysis.timesteps == [0, 100]
    assert analysis.pvalues.shape == (len(analysis.layers), 2) and analysis.n_images == 16
    sel = select_layers(analysis, 100, top_k=1)
    assert sel.best == ["mid_block"] and sel.ranking[-1] == "up_blocks.1" and sel.worst == ["up_blocks.1"]
    paths = write_analysis(tmp_path, analysis, sel)
    assert all(p.is_file() for p in paths.values()) and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "mid_block" in paths["markdown"].read_text() and "p_value" in paths["csv"].read_text()
    back, back_analysis, _ = read_selection(paths["json"])
    assert back.best == sel.best and np.allclose(back_analysis.pvalues, analysis.pvalues)
    again = analyze_gaussianity(gen, real_batch[0], timesteps=[0, 100], batch_size=5, max_values=512)
    assert not np.allclose(again.pvalues, analysis.pvalues)  # the hooks are gone: a different network output
    assert np.array_equal(again.pvalues, analyze_gaussianity(gen, real_batch[0], timesteps=[0, 100], batch_size=5,
                                                             max_values=512).pvalues)  # seeded: repeatable


# ------------------------------------------------------------------ head, losses, determinism


@pytest.mark.parametrize("size", [5, 7, 14, 16, 28])
def test_head_resize_is_torch_bilinear_as_matrix_products(size):
    x = torch.randn(2, 3, 14, 20)
    expected = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                               antialias=True)
    assert torch.allclose(resize_map(x, size), expected, atol=1e-5)


@pytest.mark.parametrize("subfeatures", ["resnet18", None])
def test_head_diffusion_channels_widen_m_and_each_channel_gets_every_subfeature_score(subfeatures, real_batch):
    paper, wide = tiny_method(subfeatures=subfeatures), tiny_method(subfeatures=subfeatures, diffusion_channels=4)
    x = real_batch[0][:4]
    maps = list(paper.frozen.features(x, 100, layers=paper.layers).values())
    assert paper.head.diffusion_map(maps).shape[1] == 1 and wide.head.diffusion_map(maps).shape[1] == 4
    n_sub = 3 if subfeatures else 1
    assert wide.head.convs[0].conv3.in_channels == 4 * n_sub and paper.head.convs[0].conv3.in_channels == n_sub
    if subfeatures:  # channel k * 3 + j of the expansion is m's channel k times score j
        m = wide.head.diffusion_map(maps)
        f_sub = resize_map(wide.head.sub(x).float(), wide.head.size)
        scores = wide.head.score(torch.cat([f_sub, m], 1)).sum((2, 3))
        assert torch.allclose(wide.head.expand(m, x)[:, 5], m[:, 1] * scores[:, 2, None, None], atol=1e-5)
    assert wide.logits_with(wide.head, x, None).shape == (4, 2)


def test_pooled_features_join_the_paper_map_at_the_fully_connected_layers(real_batch):
    paper, pooled = tiny_method(subfeatures=None), tiny_method(subfeatures=None, pooled_features=True)
    x = real_batch[0][:4]
    maps = list(pooled.frozen.features(x, 100, layers=pooled.layers).values())
    conv_dims = paper.head.fc[1].in_features
    assert paper.head.pooled_norm is None
    assert pooled.head.fc[1].in_features == conv_dims + sum(m.shape[1] for m in maps)
    head = pooled.head.eval()
    with torch.no_grad():
        head.fc[1].weight[:, :conv_dims] = 0  # silence the map path: what is left is the pooled means alone
        means = head.pooled_norm(torch.cat([m.mean(dim=(-2, -1)) for m in maps], dim=1))
        expected = head.fc(torch.cat([torch.zeros(len(x), conv_dims), means], dim=1))
        logits = head(maps)
    assert torch.allclose(logits, expected, atol=1e-5) and logits.std(dim=0).min() > 0


def test_cycle_loss_trains_the_head_and_not_the_frozen_model(real_batch):
    method = tiny_method()
    x, y = real_batch
    logits = method.logits_with(method.head, x[:8], None)
    loss = method.cycle_loss(x[:8], logits, y[:8])
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    head_grads = [p.grad for p in method.head.parameters() if p.grad is not None]
    assert head_grads and sum(g.abs().sum() for g in head_grads) > 0
    assert method.head.fc[-1].weight.grad.abs().sum() > 0  # reaches the logits layer through softmax + embedding
    assert all(p.grad is None and not p.requires_grad for p in method.frozen.parameters())
    assert all(p.grad is None for p in method.ema_head.parameters())


def test_training_loss_combines_ce_cycle_and_flip_terms(real_batch):
    x, y = real_batch
    batch = {"image": x, "target": y, "mask": torch.ones(len(y)), "index": torch.arange(len(y))}
    full = tiny_method(lambda_cycle=10.0, lambda_flip=0.1)
    logged = {}
    full.log_dict = lambda values, **_: logged.update(values)
    torch.manual_seed(0)
    loss = full.training_loss(batch)
    assert torch.isfinite(loss) and {"train/ce", "train/cycle", "train/flip"} <= set(logged)
    expected = logged["train/ce"] + 10.0 * logged["train/cycle"] + 0.1 * logged["train/flip"]
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    plain = tiny_method(lambda_cycle=0.0, lambda_flip=0.0, subfeatures=None, random_flip=False)
    logged.clear()
    plain.log_dict = lambda values, **_: logged.update(values)
    assert torch.allclose(plain.training_loss(batch).detach(), logged["train/ce"]) and set(logged) == {"train/ce"}


@pytest.mark.parametrize("input_kind", ["x0", "xt"])
def test_test_time_predictions_are_deterministic_and_batch_independent(input_kind, real_batch):
    method = tiny_method(input=input_kind)
    method.train()  # predict_logits must not depend on the module's mode
    x = real_batch[0]
    first = method.predict_logits(x)
    method.eval()
    assert torch.equal(first, method.predict_logits(x)) and torch.equal(first, method(x))
    assert torch.allclose(method.predict_logits(x[3:6]), first[3:6], atol=1e-5)
    other = tiny_method(input=input_kind)  # a rebuilt model draws the same test-time noise
    assert torch.equal(other.test_noise, method.test_noise)


def test_ema_head_lags_and_is_what_is_evaluated(real_batch):
    x, y = real_batch
    method = tiny_method(lambda_cycle=0.0, lambda_flip=0.0)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    batch = {"image": x, "target": y, "mask": torch.ones(len(y)), "index": torch.arange(len(y))}
    method.log_dict = lambda *a, **k: None
    for _ in range(3):
        opt.zero_grad()
        method.training_loss(batch).backward()
        opt.step()
        method.update_ema()
    raw = torch.cat([p.flatten() for p in method.head.parameters()])
    ema = torch.cat([p.flatten() for p in method.ema_head.parameters()])
    assert not torch.equal(raw, ema)
    method.eval()
    assert torch.equal(method.predict_logits(x), method.logits_with(method.ema_head, x, method.test_noise))


def test_ablation_rows_and_bad_options():
    for row in [*TABLE_IV.values(), *TABLE_VI.values(), *TABLE_VII.values()]:
        params = method_params("dcube", row)
        assert params.generator.backbone == "uvit"  # partial generator options keep the paper's backbone
    assert method_params("dcube", TABLE_IV["baseline"]).generator.use_contrastive is False
    with pytest.raises(ConfigError, match="layers"):
        method_params("dcube", {"layers": "best"})
    with pytest.raises(ConfigError, match="selected_layers"):
        tiny_method(layers=["nope"])
    multilabel = TaskSpec(task="multilabel", class_names=["a", "b"], channels=1, image_size=28)
    with pytest.raises(ConfigError, match="lambda_cycle"):
        create_method("dcube", multilabel, {"generator": {"size": "tiny"}}, OptimConfig(), 1)


# ------------------------------------------------------------------ the engine run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_pneumonia):
    from diffmed.engine.run import train

    run = tmp_path_factory.mktemp("dcube") / "run"
    overrides = [o for o in tiny_overrides(tiny_pneumonia, **{"method.name": "dcube", "train.max_epochs": 1})
                 if not o.startswith("method.params.backbone")]
    overrides += ["method.params.ks_images=32", "method.params.ks_timesteps=[100]"]
    overrides += [f"method.params.generator.{k}={'null' if v is None else v}" for k, v in TINY_GEN.items()]
    train(load_config(None, overrides), run)
    return run


def test_engine_trains_selects_layers_and_exports_a_self_contained_model(trained_run, tmp_path):
    from diffmed.engine.run import load_trained

    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["acc"]) and metrics["cost"]["forward_passes_per_image"] == 2.0
    stages = trained_run / "stages"
    selection, analysis, _ = read_selection(stages / "dcube_selection.json")
    assert analysis is not None and selection.timestep == 100 and selection.best
    assert (stages / "gaussianity" / "gaussianity.png").is_file()
    meta = json.loads((trained_run / "model" / "model.json").read_text())
    assert meta["params"]["selected_layers"] == selection.best and meta["params"]["generator_classes"] == 2
    logged = (trained_run / "logs" / "metrics.csv").read_text()
    assert "train/cycle" in logged and "train/flip" in logged
    assert len((trained_run / "predictions.csv").read_text().strip().splitlines()) == 1 + metrics["test"]["n"]
    # the exported model needs neither the generator stage nor its analysis
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("stages", "checkpoints"))
    method, _, _ = load_trained(copy)
    original, _, _ = load_trained(trained_run)
    x = torch.zeros(2, 1, 28, 28)
    assert torch.equal(method.predict_logits(x), original.predict_logits(x))


def test_resuming_a_run_reuses_its_generator_and_selection(trained_run):
    from diffmed.engine.run import train

    stages = trained_run / "stages"
    weights = stages / "generator" / "generator" / "model.safetensors"
    stamps = (weights.stat().st_mtime_ns, (stages / "dcube_selection.json").read_text())
    before = json.loads((trained_run / "model" / "model.json").read_text())["params"]
    train(None, trained_run, resume=True)  # the main fit is finished: stages reload, weights load strictly
    assert (weights.stat().st_mtime_ns, (stages / "dcube_selection.json").read_text()) == stamps
    assert json.loads((trained_run / "model" / "model.json").read_text())["params"] == before


def test_generator_run_is_reused_and_checked_for_leaks(trained_run, tmp_path, tiny_pneumonia):
    gen_dir = trained_run / "stages" / "generator"
    check_generator_split(gen_dir, trained_run)  # same split: fine (no splits.json beside it: not checked)
    fake = tmp_path / "gen"
    shutil.copytree(gen_dir, fake)
    splits = json.loads((trained_run / "splits.json").read_text())
    train_ids = splits["splits"]["train"] + splits["splits"]["test"][:2]
    leaked = {**splits, "splits": {**splits["splits"], "train": train_ids}}
    (fake / "splits.json").write_text(json.dumps(leaked))
    with pytest.raises(ConfigError, match="validation/test images"):
        check_generator_split(fake, trained_run)
    with pytest.raises(ConfigError, match="no trained generator"):
        check_generator_split(tmp_path, trained_run)


def test_analyze_cli_writes_the_figure_and_selection(trained_run, tmp_path):
    import typer

    from diffmed.cli_dcube import register

    app = typer.Typer()
    app.command("noop")(lambda: None)
    register(app)
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["dcube", "analyze", str(trained_run), "--out", str(out), "--images", "16",
                                      "--timesteps", "0,100", "--top-k", "1"])
    assert result.exit_code == 0, result.output
    selection, analysis, data = read_selection(out / "selection.json")
    assert len(selection.best) == 1 and analysis.timesteps == [0, 100] and (out / "gaussianity.png").is_file()
    bad = CliRunner().invoke(app, ["dcube", "analyze", str(tmp_path)])
    assert bad.exit_code == 2 and "no trained generator" in bad.output.replace("\n", " ")


def test_benchmark_reuses_a_finished_generator_of_the_rebalancing_benchmark_only(tmp_path):
    import argparse

    from diffmed.diffusion.generative import GENERATOR_DIR

    bench = load_benchmark("dcube")
    args = argparse.Namespace(work=tmp_path / "work", generators=tmp_path / "rebalance")
    own = tmp_path / "work" / "ds" / "generator-lgen-s0"
    assert bench.generator_dir(args, "ds", 0) == own  # nothing to reuse
    (tmp_path / "rebalance" / "lcont-s0" / GENERATOR_DIR).mkdir(parents=True)
    assert bench.generator_dir(args, "ds", 0) == own  # an unfinished generator is not reused
    (tmp_path / "rebalance" / "lcont-s0" / GENERATOR_DIR / "model.json").write_text("{}")
    assert bench.generator_dir(args, "ds", 0) == tmp_path / "rebalance" / "lcont-s0"
    assert bench.generator_dir(args, "ds", 0, "plain") == tmp_path / "work" / "ds" / "generator-plain-s0"
    own.mkdir(parents=True)  # the benchmark's own (e.g. killed) training is resumed, not replaced
    assert bench.generator_dir(args, "ds", 0) == own
