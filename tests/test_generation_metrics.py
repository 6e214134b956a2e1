"""Generation-quality metrics: closed forms, identities and the feature-space tag."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmed.evaluation.generation import (
    DomainFeatures, InceptionFeatures, default_extractor, feature_stats, find_inception_weights,
    frechet_distance, generation_report, kernel_inception_distance, nearest_real_ssim_psnr, precision_recall,
    train_domain_feature_extractor,
)

PNEUMONIA = "/work/shared/data/pneumoniamnist_imbalanced.npz"


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.5, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariance_is_rotation_invariant():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    v1, v2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.0, 1.0, 8.0])
    expected = np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))  # same means, same eigenbasis
    got = frechet_distance(np.zeros(4), q @ np.diag(v1) @ q.T, np.zeros(4), q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_even_when_covariance_is_singular():
    x = np.random.default_rng(1).normal(size=(20, 64))  # 20 samples in 64-d: rank-deficient covariance
    mu, cov = feature_stats(x)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-4)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=200, seed=0)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200, seed=0)
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(same)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(3).normal(size=(200, 8))
    assert precision_recall(x, x.copy(), k=3) == pytest.approx((1.0, 1.0))
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_detects_mode_collapse():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 2))
    collapsed = real[:300][np.linalg.norm(real, axis=1) < 0.5]  # fakes cover only the centre
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.9 and recall < 0.5


def test_nearest_real_ssim_psnr_picks_the_right_image():
    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, size=(6, 28, 28, 1), dtype=np.uint8)
    noisy = np.clip(real[[4, 1]].astype(int) + rng.integers(-10, 11, size=(2, 28, 28, 1)), 0, 255).astype(np.uint8)
    res = nearest_real_ssim_psnr(np.concatenate([real[[2]], noisy]), real)
    assert res["nearest"].tolist() == [2, 4, 1]
    assert res["ssim"][0] == pytest.approx(1.0) and np.isinf(res["psnr"][0]) and res["n_identical"] == 1
    assert 25 < res["psnr"][1] < 40 and 0.5 < res["ssim"][1] < 1.0


def _tiny_real():
    with np.load(PNEUMONIA) as z:
        images, labels = z["train_images"][:, :, :, None], z["train_labels"][:, 0]
    rows = np.r_[np.flatnonzero(labels == 0)[:24], np.flatnonzero(labels == 1)[:24]]
    return images[rows], labels[rows].astype(np.int64), [f"train/{i}" for i in rows]


def test_domain_extractor_tag_depends_on_training_data_and_is_saved(tmp_path):
    images, labels, ids = _tiny_real()
    ext = train_domain_feature_extractor(images, labels, epochs=1, seed=0, ids=ids, batch_size=16, device="cpu")
    assert ext.tag.startswith("domain:resnet18:")
    assert ext(images[:5]).shape == (5, 512)
    other = train_domain_feature_extractor(images[:40], labels[:40], epochs=1, seed=0, ids=ids[:40],
                                           batch_size=16, device="cpu")
    assert other.tag != ext.tag
    ext.save(tmp_path / "fx.safetensors")
    back = DomainFeatures.load(tmp_path / "fx.safetensors", device="cpu")
    assert back.tag == ext.tag
    np.testing.assert_allclose(back(images[:3]), ext(images[:3]), rtol=1e-5, atol=1e-6)


def test_generation_report_records_feature_space_and_per_class_numbers():
    images, labels, ids = _tiny_real()
    ext = train_domain_feature_extractor(images, labels, epochs=1, seed=0, ids=ids, batch_size=16, device="cpu")
    real = {"normal": images[labels == 0], "pneumonia": images[labels == 1]}
    fake = {"normal": images[labels == 0][:12], "pneumonia": np.flip(images[labels == 1], axis=2)[:12].copy()}
    rep = generation_report(real, fake, ext, kid_subsets=5, kid_subset_size=12)
    assert rep["feature_space"] == ext.tag
    assert set(rep["per_class"]) == {"normal", "pneumonia"}
    copied, flipped = rep["per_class"]["normal"], rep["per_class"]["pneumonia"]
    assert copied["precision"] == 1.0 and copied["n_identical_to_real"] == 12 and copied["ssim"] == pytest.approx(1.0)
    assert flipped["ssim"] < 0.99 and flipped["fid"] > copied["fid"]
    assert rep["overall"]["n_fake"] == 24 and rep["overall"]["n_real"] == 48


def test_inception_absent_falls_back_to_domain_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_inception_weights() is None
    with pytest.raises(Exception, match="Inception-v3 weights not found"):
        InceptionFeatures()
    images, labels, ids = _tiny_real()
    ext = default_extractor(images, labels, ids, epochs=1, device="cpu")
    assert ext.tag.startswith("domain:")


def test_inception_loads_local_weights_file(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
               folder / "inception_v3_google-test.pth")
    assert find_inception_weights() is not None
    ext = default_extractor(np.zeros((2, 28, 28, 1), np.uint8), np.array([0, 1]), device="cpu")
    assert isinstance(ext, InceptionFeatures) and ext.tag.startswith("inception")
    feats = ext(np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
