"""Offline augmentation strategies: planned counts, flags, ids, determinism, misclassified selection."""
from __future__ import annotations

import numpy as np
import pytest

from diffmed.augment import (
    ManifestProducer, TraditionalProducer, boundary_distances, build_augmented_train, misclassified_candidates,
    plan_strategy, read_manifest, write_manifest,
)
from diffmed.data.types import LabelledSet
from diffmed.errors import ConfigError, DataError

PNEUMONIA = "/work/shared/data/pneumoniamnist_imbalanced.npz"


def _train(n_normal: int = 6, n_pneumonia: int = 30) -> LabelledSet:
    with np.load(PNEUMONIA) as z:
        images, labels = z["train_images"], z["train_labels"][:, 0]
    rows = np.r_[np.flatnonzero(labels == 0)[:n_normal], np.flatnonzero(labels == 1)[:n_pneumonia]]
    return LabelledSet(images=images[rows][..., None], targets=labels[rows].astype(np.int64), task="binary",
                       class_names=["normal", "pneumonia"], ids=[f"train/{i}" for i in rows],
                       split=np.full(len(rows), "train", dtype=object), source="tiny")


def test_unbalanced_counts_follow_the_thesis_rule():
    train = _train()
    out = build_augmented_train(train, "unbalanced", "traditional", seed=0)  # k=11, 1/3 of the majority once
    assert out.class_counts().tolist() == [6 + 6 * 11, 30 + 10]
    new = out.subset(out.synthetic)
    assert new.class_counts().tolist() == [66, 10]
    majority_sources = {i.split("/")[2] for i, t in zip(new.ids, new.targets) if t == 1}
    assert len(majority_sources) == 10 and all(i.endswith("/0") for i, t in zip(new.ids, new.targets) if t == 1)


def test_unbalanced_k_and_fraction_are_configurable():
    out = build_augmented_train(_train(), "unbalanced", seed=0, k=2, majority_fraction=0.0)
    assert out.class_counts().tolist() == [18, 30]


def test_balanced_fills_each_class_to_the_largest_using_sources_evenly():
    train = _train(n_normal=7)
    out = build_augmented_train(train, "balanced", seed=0)
    assert out.class_counts().tolist() == [30, 30]
    sources = [i.rsplit("/", 1)[0] for i in out.ids if i.startswith("aug/")]
    uses = np.unique(sources, return_counts=True)[1]
    assert len(sources) == 23 and sorted(uses.tolist()) == [3] * 5 + [4] * 2


def test_only_new_rows_are_synthetic_ids_unique_and_real_rows_unchanged():
    train = _train()
    out = build_augmented_train(train, "balanced", seed=3)
    assert not out.synthetic[: len(train)].any() and out.synthetic[len(train):].all()
    assert len(set(out.ids)) == len(out)
    assert all(i.startswith("aug/train/") for i in out.ids[len(train):])
    np.testing.assert_array_equal(out.images[: len(train)], train.images)
    assert (out.split == "train").all()
    new = out.images[len(train):]
    assert new.dtype == np.uint8 and new.shape[1:] == (28, 28, 1)


def test_seeded_determinism():
    train = _train()
    a = build_augmented_train(train, "unbalanced", seed=7, k=2)
    b = build_augmented_train(train, "unbalanced", seed=7, k=2)
    c = build_augmented_train(train, "unbalanced", seed=8, k=2)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_traditional_image_does_not_depend_on_plan_order():
    train = _train()
    producer = TraditionalProducer()
    full = producer(train, plan_strategy(train, "misclassified", seed=0, k=3, candidates=np.array([0, 2, 5])), 1)
    alone = producer(train, plan_strategy(train, "misclassified", seed=0, k=3, candidates=np.array([5])), 1)
    np.testing.assert_array_equal(full.images[-3:], alone.images)
    assert full.ids[-3:] == alone.ids
    assert not all(np.array_equal(full.images[j], train.images[0]) for j in range(3))


def _two_class_features():
    """Class 1 iff x > 0 for the model; x spreads widely so PCA's first axis is x."""
    rng = np.random.default_rng(0)
    x = np.r_[rng.uniform(-5, 5, 200), [0.1, -0.2, 0.15, 4.5, -4.2]]
    feats = np.c_[x, 0.1 * rng.normal(size=(len(x), 4))]
    p1 = 1 / (1 + np.exp(-3 * x))
    probs = np.c_[1 - p1, p1]
    targets = (x > 0).astype(int)
    near, far = np.arange(200, 203), np.arange(203, 205)
    targets[near], targets[far] = 1 - targets[near], 1 - targets[far]  # mislabelled: misclassified
    return feats, probs, targets, near, far


def test_misclassified_candidates_pick_wrong_images_near_the_boundary_only():
    feats, probs, targets, near, far = _two_class_features()
    dist = boundary_distances(feats, probs, targets)
    assert np.allclose(dist[near], np.abs(feats[near, 0]), atol=0.05)  # the boundary is x = 0
    picked = misclassified_candidates(feats, probs, targets)
    assert sorted(picked.tolist()) == sorted(near.tolist())
    assert not set(far) & set(picked)


def test_misclassified_strategy_augments_the_candidates_k_times():
    train = _train()
    out = build_augmented_train(train, "misclassified", seed=0, k=4, candidates=np.array([1, 10]))
    new_ids = out.ids[len(train):]
    assert len(new_ids) == 8
    assert {i.rsplit("/", 1)[0] for i in new_ids} == {f"aug/{train.ids[1]}", f"aug/{train.ids[10]}"}
    with pytest.raises(ConfigError, match="candidates"):
        build_augmented_train(train, "misclassified")


def test_validation_and_test_rows_are_refused():
    train = _train()
    train.split[3] = "val"
    with pytest.raises(DataError, match="training split only"):
        build_augmented_train(train, "balanced")
    synthetic = _train()
    synthetic.synthetic = np.zeros(len(synthetic), bool)
    synthetic.synthetic[0] = True
    with pytest.raises(DataError, match="synthetic"):
        build_augmented_train(synthetic, "balanced")


def test_unknown_names_and_multilabel_are_config_errors():
    with pytest.raises(ConfigError, match="strategy"):
        build_augmented_train(_train(), "oversample")
    with pytest.raises(ConfigError, match="producer"):
        build_augmented_train(_train(), "balanced", "gan")
    ml = LabelledSet(images=np.zeros((2, 4, 4, 1), np.uint8), targets=np.ones((2, 2), np.float32),
                     task="multilabel", class_names=["a", "b"], ids=["0", "1"])
    with pytest.raises(ConfigError, match="single-label"):
        build_augmented_train(ml, "balanced")


def test_manifest_round_trip_and_diffusion_producer(tmp_path):
    train = _train()
    pool = build_augmented_train(train, "unbalanced", seed=0, k=3)  # stands in for generated images
    csv = write_manifest(pool, tmp_path / "gen")
    assert (tmp_path / "gen" / "images" / "normal").is_dir()
    loaded = ManifestProducer(csv).pool(train)
    assert loaded.class_counts().tolist() == [18, 10]
    np.testing.assert_array_equal(loaded.images, pool.images[pool.synthetic])

    out = build_augmented_train(train, "unbalanced", "diffusion", seed=0, k=2, majority_fraction=0.2, manifest=csv)
    new = out.subset(out.synthetic)
    assert new.class_counts().tolist() == [12, 6]
    assert all(i.startswith("gen/") for i in new.ids) and len(set(new.ids)) == len(new)
    with pytest.raises(DataError, match="generated images of class 'normal'"):
        build_augmented_train(train, "unbalanced", "diffusion", seed=0, k=4, manifest=csv)


def test_mixed_producer_splits_the_plan_between_producers(tmp_path):
    train = _train()
    csv = write_manifest(build_augmented_train(train, "balanced", seed=1), tmp_path / "gen")
    out = build_augmented_train(train, "balanced", "mixed", seed=0, manifest=csv)
    new = out.subset(out.synthetic)
    assert new.class_counts().tolist() == [24, 0]
    kinds = [i.split("/")[0] for i in new.ids]
    assert 0 < kinds.count("aug") < 24 and kinds.count("aug") + kinds.count("gen") == 24


def test_ordinal_set_reads_and_mixes_a_manifest_as_ordinal_training_rows_only(tmp_path, tiny_retina):
    from diffmed.config import load_config
    from diffmed.engine.data import prepare_data

    cfg = load_config(None, [f"data.source={tiny_retina}"])
    plain = prepare_data(cfg, tmp_path / "plain")
    train = plain.sets["train"]
    assert train.task == "ordinal"
    rare = train.subset(train.targets >= 3)  # stand-ins for generated grade-3/4 images
    rare.ids = [f"gen/{i}" for i in range(len(rare))]
    manifest = write_manifest(rare, tmp_path / "gen", only_synthetic=False)

    back = read_manifest(manifest, train)  # a bare label column alone would read as multiclass
    assert back.task == "ordinal" and back.class_names == train.class_names
    assert back.class_counts().tolist() == rare.class_counts().tolist()

    mixed_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": [str(manifest)]})})
    mixed = prepare_data(mixed_cfg, tmp_path / "mixed")
    assert mixed.sets["train"].task == "ordinal"
    assert int(mixed.sets["train"].synthetic.sum()) == len(rare) > 0
    for split in ("val", "test"):
        assert mixed.sets[split].ids == plain.sets[split].ids
        assert mixed.sets[split].synthetic is None or not mixed.sets[split].synthetic.any()


def test_read_manifest_refuses_a_multilabel_set_by_name(tmp_path):
    train = _train()
    manifest = write_manifest(train.subset(np.arange(4)), tmp_path / "gen", only_synthetic=False)
    multi = LabelledSet(images=train.images[:4], targets=np.eye(2, dtype=np.float32)[[0, 1, 0, 1]],
                        task="multilabel", class_names=["a", "b"], ids=list("wxyz"), source="chest.csv")
    with pytest.raises(ConfigError, match="chest.csv.*cannot take it"):
        read_manifest(manifest, multi)
