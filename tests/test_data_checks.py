"""Label policies, splits (grouped, stratified, reused) and the dataset fingerprint / leak checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffmed.config import DataConfig, RunConfig
from diffmed.data import (LabelledSet, apply_label_policies, check_dataset, fingerprint, load_source,
                          relabel_uncertain, resolve_splits)
from diffmed.data.check import format_fingerprint
from diffmed.data.labels import selftrained_columns
from diffmed.data.splits import load_splits, make_splits, subsample_train
from diffmed.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAM = DATA / "ham10000_subset"
needs_ham = pytest.mark.skipif(not (HAM / "labels.csv").is_file(), reason="HAM10000 subset not present")
nan = np.nan


def multilabel_set() -> LabelledSet:
    t = np.array([[1, -1, nan], [0, 1, -1], [-1, nan, 0], [nan, 0, 1]], np.float32)
    return LabelledSet(images=np.zeros((4, 2, 2, 1), np.uint8), targets=t, task="multilabel",
                       class_names=["a", "b", "c"], ids=[f"r{i}" for i in range(4)])


def single_set(n: int, n_classes: int = 3, seed: int = 0, groups: bool = False) -> LabelledSet:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), np.linspace(n * 0.6, n * 0.1, n_classes).astype(int))[:n]
    y = np.concatenate([y, np.zeros(n - len(y), int)])
    g = np.array([f"p{i // 3 if i % 2 else i // 2}" for i in range(n)], dtype=object) if groups else None
    images = rng.integers(0, 255, (n, 4, 4, 1), dtype=np.uint8)
    return LabelledSet(images=images, targets=y.astype(np.int64), task="multiclass",
                       class_names=[f"c{k}" for k in range(n_classes)], ids=[f"img{i}.png" for i in range(n)],
                       groups=g)


# ------------------------------------------------------------------ label policies


def test_u_ignore_and_missing_policies():
    ds = multilabel_set()
    out, three = apply_label_policies(ds, "ignore", "fill0")
    assert three == []
    np.testing.assert_array_equal(out.targets, [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(out.mask, [[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]])
    out, _ = apply_label_policies(ds, "ignore", "fill1")
    np.testing.assert_array_equal(out.targets, [[1, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 1]])
    out, _ = apply_label_policies(ds, "zeros", "ignore")
    np.testing.assert_array_equal(out.targets, [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(out.mask, [[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 1, 1]])
    assert np.isnan(ds.targets).sum() == 3  # the input set is untouched


def test_u_ones_multiclass_and_per_column():
    ds = multilabel_set()
    out, _ = apply_label_policies(ds, "ones", "fill0")
    np.testing.assert_array_equal(out.targets, [[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]])
    assert out.mask.all()
    out, three = apply_label_policies(ds, "multiclass", "fill0")
    assert three == [0, 1, 2]
    np.testing.assert_array_equal(out.targets, [[1, 2, 0], [0, 1, 2], [2, 0, 0], [0, 0, 1]])
    out, three = apply_label_policies(ds, {"a": "ones", "c": "multiclass"}, "fill0")  # b: default ignore
    assert three == [2]
    np.testing.assert_array_equal(out.targets, [[1, 0, 0], [0, 1, 2], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(out.mask, [[1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])


def test_u_selftrained_two_stages():
    ds = multilabel_set()
    stage1, three = apply_label_policies(ds, {"b": "selftrained", "c": "zeros"}, "fill0")
    assert three == [] and stage1.mask[0, 1] == 0  # stage one behaves like U-Ignore
    cols = selftrained_columns(ds, {"b": "selftrained", "c": "zeros"})
    assert cols == [1]
    probs = np.full((4, 3), 0.7, np.float32)
    stage2 = relabel_uncertain(stage1, ds.targets, probs, cols)
    assert stage2.targets[0, 1] == pytest.approx(0.7) and stage2.mask[0, 1] == 1
    np.testing.assert_array_equal(np.delete(stage2.targets, 1, axis=1), np.delete(stage1.targets, 1, axis=1))
    assert relabel_uncertain(stage1, ds.targets, probs, ["b"]).targets[0, 1] == pytest.approx(0.7)


def test_policy_errors_and_single_label_noop():
    ds = multilabel_set()
    with pytest.raises(ConfigError, match=r"\['zz'\].*valid columns: a, b, c"):
        apply_label_policies(ds, {"zz": "ones"}, "fill0")
    with pytest.raises(ConfigError, match="'maybe'.*ignore, zeros, ones, multiclass, selftrained"):
        apply_label_policies(ds, {"a": "maybe"}, "fill0")
    with pytest.raises(ConfigError, match="'fill2'.*ignore, fill0, fill1"):
        apply_label_policies(ds, "ones", "fill2")
    single = single_set(10)
    out, three = apply_label_policies(single, "ones", "fill1")
    assert out is single and three == []


# ------------------------------------------------------------------ splits


def test_grouped_stratified_split():
    ds = single_set(600, groups=True)
    sp = make_splits(ds, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert sorted(sum(sp.values(), [])) == list(range(600))
    group_split = {}
    for s, idx in sp.items():
        for i in idx:
            assert group_split.setdefault(ds.groups[i], s) == s, f"group {ds.groups[i]} in two splits"
    assert abs(len(sp["test"]) - 120) <= 3 and abs(len(sp["val"]) - 60) <= 3
    overall = np.bincount(ds.targets, minlength=3) / 600
    for s in ("train", "val", "test"):
        share = np.bincount(ds.targets[sp[s]], minlength=3) / len(sp[s])
        assert np.abs(share - overall).max() < 0.05
    assert make_splits(ds, 3, 0.1, 0.2) == sp and make_splits(ds, 4, 0.1, 0.2) != sp


def test_ungrouped_split_sizes_exact_and_given_splits_kept():
    ds = single_set(100)
    sp = make_splits(ds, 0, 0.1, 0.2)
    assert [len(sp[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    ds.split = np.array(["test"] * 30 + ["train"] * 70, dtype=object)
    sp = make_splits(ds, 0, 0.1, 0.2)
    assert sp["test"] == list(range(30)) and len(sp["val"]) == 10 and set(sp["val"]) <= set(range(30, 100))
    ds.split[30:40] = "val"
    sp = make_splits(ds, 0, 0.4, 0.4)  # fractions ignored: everything given
    assert sp == {"train": list(range(40, 100)), "val": list(range(30, 40)), "test": list(range(30))}
    with pytest.raises(ConfigError, match="val_fraction"):
        make_splits(ds, 0, 0.6, 0.5)


def test_splits_json_reused_and_verified(tmp_path):
    ds = single_set(120, groups=True)
    cfg = RunConfig(data=DataConfig(split_seed=1))
    sp = resolve_splits(ds, cfg, tmp_path)
    doc = json.loads((tmp_path / "splits.json").read_text())
    assert doc["splits"]["test"] == [ds.ids[i] for i in sp["test"]]
    assert doc["fingerprint"]["seed"] == 1 and doc["fingerprint"]["counts"]["test"] == len(sp["test"])
    # a different seed does not matter once the file exists: it is reused
    assert resolve_splits(ds, DataConfig(split_seed=99), tmp_path) == sp
    # reordered rows: the same ids end up in the same splits
    order = np.arange(120)[::-1]
    rev = ds.subset(order)
    sp_rev = load_splits(tmp_path / "splits.json", rev)
    assert sorted(rev.ids[i] for i in sp_rev["test"]) == sorted(ds.ids[i] for i in sp["test"])
    # a row removed from the data, or an id renamed in the file: clear error naming the file
    with pytest.raises(DataError, match=r"splits.json.*1 id\(s\) in the file are not in the data.*delete"):
        load_splits(tmp_path / "splits.json", ds.subset(np.arange(1, 120)))
    doc["splits"]["train"][0] = "someone_else.png"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="someone_else.png.*in no split"):
        load_splits(tmp_path / "bad.json", ds)


def test_subsample_train_stratified_and_seeded(tmp_path):
    ds = single_set(300)
    sp = make_splits(ds, 0, 0.1, 0.2)
    sub = subsample_train(sp["train"], ds, 0.1, seed=5)
    assert set(sub) <= set(sp["train"]) and abs(len(sub) - 0.1 * len(sp["train"])) <= 3
    assert set(ds.targets[sub]) == set(ds.targets[sp["train"]])
    assert sub == subsample_train(sp["train"], ds, 0.1, seed=5) != subsample_train(sp["train"], ds, 0.1, seed=6)
    full = resolve_splits(ds, DataConfig(train_fraction=0.1), tmp_path / "s.json")
    assert full == sp  # the file and the result keep the whole split; the caller subsamples
    with pytest.raises(ConfigError, match="train_fraction"):
        subsample_train(sp["train"], ds, 0.0, 0)


# ------------------------------------------------------------------ fingerprint / leaks


def test_fingerprint_finds_duplicates_and_conflicts():
    ds = single_set(40)
    ds.images[5], ds.targets[5] = ds.images[30], ds.targets[30]  # same image and label, train vs test
    ds.images[7] = ds.images[8]
    ds.targets[7], ds.targets[8] = 0, 1  # identical image, conflicting labels
    splits = {"train": [i for i in range(40) if i not in (30, 31)], "val": [31], "test": [30]}
    fp = fingerprint(ds, splits)
    assert fp["duplicates_across_splits"]["count"] == 1
    assert fp["duplicates_across_splits"]["pairs"] == [{"a": "img5.png", "a_split": "train", "b": "img30.png", "b_split": "test"}]
    assert fp["conflicting_labels"]["count"] == 1
    assert fp["conflicting_labels"]["groups"][0]["ids"] == ["img7.png", "img8.png"]
    assert fp["conflicting_labels"]["groups"][0]["labels"] == ["c0", "c1"]
    assert fp["split_sizes"] == {"train": 38, "val": 1, "test": 1}
    assert fp["image"] == {"height": 4, "width": 4, "channels": 1, "dtype": "uint8"}
    text = format_fingerprint(fp)
    assert "Identical images across splits: 1" in text and "img5.png (train) == img30.png (test)" in text
    assert "Identical images with conflicting labels: 1" in text
    json.dumps(fp)  # plain JSON


@needs_ham
def test_check_dataset_on_ham_slice(tmp_path):
    df = pd.read_csv(HAM / "labels.csv").groupby("dx").head(6).reset_index(drop=True)
    df["lesion_id"] = [f"L{i // 2}" for i in range(len(df))]
    # the same picture under a second name with another diagnosis: a leak and a label conflict
    shutil.copy(HAM / "images" / df.path[0], tmp_path / "copy.jpg")
    dup = df.iloc[[0]].assign(path=str(tmp_path / "copy.jpg"), lesion_id="Lcopy",
                              dx="mel" if df.dx[0] != "mel" else "nv")
    df = pd.concat([df, dup], ignore_index=True)
    df["split"] = ["test" if i % 4 == 0 else "train" for i in range(len(df))]
    df.loc[0, "split"], df.loc[len(df) - 1, "split"] = "train", "test"  # original in train, copy in test
    df.loc[len(df)] = df.iloc[1].copy()
    df.loc[len(df) - 1, ["path", "lesion_id"]] = ["nope/ISIC_missing.jpg", "Lmiss"]
    csv = tmp_path / "ham.csv"
    df.to_csv(csv, index=False)
    cfg = DataConfig(source=str(csv), image_root=str(HAM / "images"), label_columns=["dx"],
                     group_column="lesion_id", split_column="split", image_size=16, max_bad_files=1)
    out = tmp_path / "run"
    fp = check_dataset(cfg, out)
    assert (out / "splits.json").is_file() and json.loads((out / "fingerprint.json").read_text()) == fp
    assert fp["skipped"]["count"] == 1 and fp["skipped"]["files"][0]["row"] == len(df) + 1
    copy = str(tmp_path / "copy.jpg")
    assert fp["duplicates_across_splits"] == {"count": 1, "pairs": [
        {"a": df.path[0], "a_split": "train", "b": copy, "b_split": "test"}]}
    assert fp["conflicting_labels"]["count"] == 1
    assert fp["conflicting_labels"]["groups"][0]["ids"] == [df.path[0], copy]
    ds = load_source(cfg)
    where = {i: s for s, idx in load_splits(out / "splits.json", ds).items() for i in idx}
    assert {s for i, s in where.items() if ds.split[i] == "test"} == {"test"}
    assert "val" in where.values()  # carved out of the given training rows, by lesion
    assert fp["groups_across_splits"]["count"] > 0  # the given split separates lesion pairs: reported
    lesion_split = {}
    for i, s in where.items():
        if ds.split[i] == "train":
            assert lesion_split.setdefault(ds.groups[i], s) == s
    assert check_dataset(cfg, out) == fp  # second run reuses splits.json
    assert "Imbalance ratio" in format_fingerprint(fp)
