"""The baseline method: timm backbones, imbalance handling, task losses, multi-label end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from diffmed.config import OptimConfig, load_config
from diffmed.data.dataset import EpochSampler, balanced_weights
from diffmed.data.types import LabelledSet, TaskSpec
from diffmed.engine.run import train
from diffmed.errors import ConfigError
from diffmed.methods import create_method
from diffmed.methods.losses import classification_loss, focal_cross_entropy, probabilities
from diffmed.models import create_backbone

SPEC = TaskSpec("multiclass", ["a", "b", "c"], channels=1, image_size=28)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
def test_backbones_by_name_at_28px(name):
    net = create_backbone(name, in_chans=1, num_classes=3, image_size=28)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_small_stem_keeps_resolution_and_unknown_backbone_suggests():
    net = create_backbone("resnet18", 3, 2, 28)
    assert net.forward_features(torch.randn(1, 3, 28, 28)).shape[-1] == 4  # 28 -> 4 with a CIFAR stem, 1 without
    at_64 = create_backbone("resnet18", 3, 2, 64)  # stride 2 from 33 px: the first stage at 32 x 32
    assert at_64.conv1.stride == (2, 2) and at_64.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 4
    deep_stem = create_backbone("resnet10t", 1, 2, 8).eval()  # a Sequential stem: its first conv to stride 1
    assert deep_stem.forward_features(torch.randn(1, 1, 8, 8)).shape[-1] == 1  # 8 -> 1; without: an error
    assert deep_stem.conv1[0].stride == (1, 1) and deep_stem.conv1[0].in_channels == 1
    with pytest.raises(ConfigError, match="resnet18"):
        create_backbone("resnet18x", 1, 2, 28)


def test_pretrained_weights_from_a_local_safetensors_file(tmp_path):
    src = create_backbone("resnet18", 1, 2, 28)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = create_backbone("resnet18", 1, 2, 28, pretrained=str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x))
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("resnet18", 1, 2, 28, pretrained=str(tmp_path / "missing.pth"))


def test_class_weighting_and_focal_loss():
    counts = np.array([90, 9, 1])
    m = create_method("baseline", SPEC, {"class_weighting": True}, OptimConfig(), 1, counts)
    w = m.class_weights
    assert w[2] > w[1] > w[0] and torch.isclose((w * torch.tensor(counts)).sum(), torch.tensor(100.0))
    logits, target = torch.tensor([[4.0, 0, 0], [0, 0, 0.1]]), torch.tensor([0, 2])
    ce = focal_cross_entropy(logits, target, None, 0.0)
    focal = focal_cross_entropy(logits, target, None, 2.0)
    assert focal < ce  # the easy example is down-weighted


def test_balanced_sampler_equalises_classes_and_depends_only_on_seed_and_epoch():
    ds = LabelledSet(np.zeros((100, 2, 2, 1), np.uint8), np.array([0] * 90 + [1] * 10), "binary", ["n", "p"],
                     [str(i) for i in range(100)])
    sampler = EpochSampler(100, seed=3, weights=balanced_weights(ds))
    sampler.set_epoch(2)
    order = list(sampler)
    share = np.mean(ds.targets[order] == 1)
    assert 0.35 < share < 0.65
    again = EpochSampler(100, seed=3, weights=balanced_weights(ds))
    again.set_epoch(2)
    assert list(again) == order
    again.set_epoch(3)
    assert list(again) != order


def test_multilabel_loss_masks_ignored_entries_and_three_way_columns():
    spec = TaskSpec("multilabel", ["x", "y"], 1, 28, three_way_columns=[1])
    logits = torch.zeros(2, 3, requires_grad=True)
    batch = {"target": torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "mask": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    loss = classification_loss(logits, batch, spec)
    loss.backward()
    assert logits.grad[1, 0] == 0  # masked entry trains nothing
    assert logits.grad[0, 2] != 0  # the uncertain logit of the three-way column is trained
    probs = probabilities(torch.tensor([[0.0, 2.0, 5.0]]), spec)
    torch.testing.assert_close(probs, torch.sigmoid(torch.tensor([[0.0, 2.0]])))


@pytest.fixture(scope="module")
def multilabel_csv(tmp_path_factory, ham_slice):
    """Real HAM10000 images with three derived labels, some uncertain (-1) and some blank."""
    table = pd.read_csv(ham_slice)
    table["melanocytic"] = table["dx"].isin(["nv", "mel"]).astype(int)
    table["malignant"] = table["dx"].isin(["mel", "bcc", "akiec"]).astype(float)
    table.loc[table["dx"] == "bkl", "malignant"] = -1  # uncertain
    table["vascular"] = (table["dx"] == "vasc").astype(float)
    table.loc[table.index % 7 == 0, "vascular"] = np.nan  # not mentioned
    out = tmp_path_factory.mktemp("ml") / "labels.csv"
    table.to_csv(out, index=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["ignore", "multiclass", "selftrained"])
def test_multilabel_end_to_end_with_uncertain_policies(tmp_path, multilabel_csv, ham_root, policy):
    overrides = tiny_overrides(multilabel_csv, **{
        "data.image_root": str(ham_root), "data.image_size": 32, "data.group_column": "lesion_id",
        "data.label_columns": "[melanocytic, malignant, vascular]", "data.missing_policy": "fill0",
        "data.uncertain_policy": "{malignant: %s}" % policy, "train.max_epochs": 1, "train.monitor": "val/loss",
        "train.monitor_mode": "min"})
    run_dir = train(load_config(None, overrides), tmp_path / policy)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["task"] == "multilabel" and len(m["thresholds"]) == 3
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert {"target_malignant", "prob_malignant", "pred_malignant"} <= set(preds.columns)
    if policy == "selftrained":
        assert (run_dir / "stages" / "selftrain" / "checkpoints" / "last.ckpt").is_file()
    if policy == "multiclass":
        meta = json.loads((run_dir / "model" / "model.json").read_text())
        assert meta["three_way_columns"] == [1]


def test_ema_option_trains(tmp_path, tiny_pneumonia):
    run_dir = train(load_config(None, tiny_overrides(tiny_pneumonia, **{"train.max_epochs": 1, "train.ema_decay": 0.9})),
                    tmp_path / "ema")
    assert (run_dir / "metrics.json").is_file()
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    averaged, raw = best["state_dict"], best["current_model_state"]  # Lightning's WeightAveraging keeps both
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    changed = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], averaged[k])]
    assert changed and all(torch.equal(exported[k], averaged[k]) for k in changed if k in exported)
    assert any(k in exported for k in changed)  # the exported model is the averaged one


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_gradcam_draws_cnn_maps_and_skips_token_models(tmp_path, name):
    from diffmed.report.gradcam import plot_gradcam

    method = create_method("baseline", SPEC, {"backbone": name}, OptimConfig(), 1)
    out = plot_gradcam(method, torch.rand(2, 1, 28, 28), [0, 1], SPEC.class_names, tmp_path / "cam.png")
    assert (out is not None) == (name == "resnet18") and (tmp_path / "cam.png").is_file() == (name == "resnet18")
