"""Loading every kind of source, image formats (PNG 16-bit, JPEG, DICOM) and bad-input messages."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmed.config import DataConfig
from diffmed.data import LabelledSet, load_source, read_image
from diffmed.data import sources
from diffmed.data.images import is_dicom
from diffmed.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAM = DATA / "ham10000_subset"
needs_data = pytest.mark.skipif(not (DATA / "pneumoniamnist.npz").is_file(), reason="shared data not present")
needs_ham = pytest.mark.skipif(not (HAM / "labels.csv").is_file(), reason="HAM10000 subset not present")
SECRETS = ("Doe", "Jane", "SECRET-4711", "19700101")


def ham_slice(per_class: int = 6) -> pd.DataFrame:
    """The first ``per_class`` rows of every diagnosis (~40 rows), lesion ids paired into groups."""
    df = pd.read_csv(HAM / "labels.csv")
    df = df.groupby("dx", sort=True).head(per_class).reset_index(drop=True)
    df["lesion_id"] = [f"L{i // 2}" for i in range(len(df))]  # two images per lesion
    return df


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def write_dicom(path: Path, raw: np.ndarray, photometric: str = "MONOCHROME1", slope: float = 2.0,
                intercept: float = -1000.0, window: tuple[str, str] | None = ("0", "200")) -> Path:
    """A 16-bit DICOM with patient identifiers that must never show up in messages."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "SECRET-4711", "19700101"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------ MedMNIST


@needs_data
def test_npz_keeps_official_split_and_medmnist_metadata():
    ds = load_source(DataConfig(source=str(DATA / "pneumoniamnist.npz")))
    assert isinstance(ds, LabelledSet)
    assert ds.task == "binary" and ds.class_names == ["normal", "pneumonia"]
    assert ds.images.shape == (5856, 28, 28, 1) and ds.images.dtype == np.uint8
    assert {s: int((ds.split == s).sum()) for s in ("train", "val", "test")} == {"train": 4708, "val": 524, "test": 624}
    assert ds.subset(ds.split == "train").class_counts().tolist() == [1214, 3494]
    assert ds.ids[17] == "train/17" and ds.ids[4708] == "val/0"


@needs_data
def test_npz_prefix_match_resize_and_channels():
    ds = load_source(DataConfig(source=str(DATA / "pneumoniamnist_imbalanced.npz")))
    assert ds.class_names == ["normal", "pneumonia"]
    assert ds.subset(ds.split == "train").class_counts().tolist() == [388, 3494]
    rgb = load_source(DataConfig(source=str(DATA / "retinamnist.npz"), image_size=32))
    assert rgb.task == "ordinal" and rgb.class_names == ["0", "1", "2", "3", "4"]
    assert rgb.images.shape == (1600, 32, 32, 3)
    grey = load_source(DataConfig(source=str(DATA / "retinamnist.npz"), channels=1, task="multiclass"))
    assert grey.images.shape == (1600, 28, 28, 1) and grey.task == "multiclass"
    with pytest.raises(ConfigError, match="binary"):
        load_source(DataConfig(source=str(DATA / "retinamnist.npz"), task="binary"))


@needs_data
def test_medmnist_name_found_in_diffmed_data(tmp_path, monkeypatch):
    (tmp_path / "pneumoniamnist.npz").symlink_to(DATA / "pneumoniamnist.npz")
    monkeypatch.setenv("DIFFMED_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "_download_medmnist", lambda *a: pytest.fail("must not download"))
    assert len(load_source(DataConfig(source="pneumoniamnist"))) == 5856


def test_medmnist_name_offline_message(tmp_path, monkeypatch):
    def offline(name, folder):
        raise OSError("Name or service not known")

    monkeypatch.setenv("DIFFMED_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "_download_medmnist", offline)
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source="pneumoniamnist"))
    msg = str(err.value)
    assert f"PneumoniaMNIST file not found at {tmp_path / 'pneumoniamnist.npz'}" in msg
    assert "offline?" in msg and "DIFFMED_DATA" in msg and "--data" in msg
    with pytest.raises(DataError, match="MedMNIST names"):
        load_source(DataConfig(source="notamnist"))


# ------------------------------------------------------------------ CSV / folders


@needs_ham
def test_ham_csv_slice_with_lesion_groups(tmp_path):
    df = ham_slice()
    csv = write_csv(df, tmp_path / "ham.csv")
    cfg = DataConfig(source=str(csv), image_root=str(HAM / "images"), label_columns=["dx"],
                     group_column="lesion_id", image_size=32)
    ds = load_source(cfg)
    assert ds.task == "multiclass"
    assert ds.class_names == sorted(df.dx.unique()) and len(ds.class_names) == 7
    assert ds.images.shape == (len(df), 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.ids == df.path.tolist()  # thread pool keeps the manifest order
    assert ds.groups.tolist() == df.lesion_id.tolist()
    assert [ds.class_names[t] for t in ds.targets] == df.dx.tolist()
    one = read_image(HAM / "images" / df.path[5], None, 32)
    assert np.array_equal(ds.images[5], one)
    # class order from the config; grade-like order with a forced ordinal task
    order = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
    ds2 = load_source(cfg.model_copy(update={"class_names": order, "task": "ordinal"}))
    assert ds2.class_names == order and ds2.task == "ordinal"
    assert [order[t] for t in ds2.targets] == df.dx.tolist()


@needs_ham
def test_folder_with_labels_csv_and_split_column(tmp_path):
    df = ham_slice(2)
    df["split"] = ["train", "test"] * (len(df) // 2)
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for p in df.path:
        (root / "images" / p).parent.mkdir(exist_ok=True)
        shutil.copy(HAM / "images" / p, root / "images" / p)
    write_csv(df, root / "labels.csv")
    ds = load_source(DataConfig(source=str(root), label_columns=["dx"], split_column="split", image_size=16))
    assert ds.split.tolist() == df.split.tolist() and len(ds) == len(df)


@needs_ham
def test_class_folder_tree(tmp_path):
    df = ham_slice(3)
    for p in df[df.dx.isin(["bcc", "nv"])].path:
        (tmp_path / p).parent.mkdir(exist_ok=True)
        shutil.copy(HAM / "images" / p, tmp_path / p)
    (tmp_path / "nv" / "notes.txt").write_text("not an image, ignored")
    ds = load_source(DataConfig(source=str(tmp_path), image_size=24, channels=1))
    assert ds.task == "binary" and ds.class_names == ["bcc", "nv"]
    assert ds.images.shape == (6, 24, 24, 1)
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(i.startswith(("bcc/", "nv/")) for i in ds.ids)
    with pytest.raises(DataError, match="'mel'"):
        load_source(DataConfig(source=str(tmp_path), class_names=["bcc", "nv", "mel"]))


def test_multilabel_csv_values(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,a,b,c\n0.png,1,0,\n1.png,-1.0,1.0,0\n2.png,,,-1\n")
    ds = load_source(DataConfig(source=str(csv), label_columns=["a", "b", "c"], image_size=8))
    assert ds.task == "multilabel" and ds.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.targets, np.array([[1, 0, np.nan], [-1, 1, 0], [np.nan, np.nan, -1]], np.float32))
    csv.write_text("path,a,b,c\n0.png,1,0,\n1.png,2,1,0\n2.png,,,-1\n")
    with pytest.raises(DataError, match=r"row 3: value '2' in label column 'a'"):
        load_source(DataConfig(source=str(csv), label_columns=["a", "b", "c"], image_size=8))


# ------------------------------------------------------------------ image formats


def test_dicom_monochrome1_rescale_and_window(tmp_path):
    raw = np.array([[0, 450, 475, 500], [525, 550, 4000, 500], [500, 500, 500, 500], [0, 0, 0, 0]], np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", raw)
    img = read_image(path, None, 4)
    assert img.shape == (4, 4, 1) and img.dtype == np.uint16
    hu = raw * 2.0 - 1000.0  # RescaleSlope 2, RescaleIntercept -1000
    expected = 65535 - np.round(np.clip((hu + 100) / 200, 0, 1) * 65535)  # window 0 +- 100, then inverted
    np.testing.assert_array_equal(img[..., 0], expected.astype(np.uint16))
    assert img[0, 0, 0] == 65535 and img[1, 1, 0] == 0 and img[0, 3, 0] == 32767  # -1000 HU white, +100 HU black
    # explicit window overrides the header's: center 500, width 1000 -> [0, 1000] HU
    img = read_image(path, None, 4, dicom_window=(500.0, 1000.0))
    assert img[0, 3, 0] == 65535 and img[1, 1, 0] == 65535 - round(0.1 * 65535) and img[1, 2, 0] == 0
    # no window in the header, MONOCHROME2: the pixel range maps to [0, 65535]
    plain = write_dicom(tmp_path / "plain", raw, photometric="MONOCHROME2", window=None)
    assert is_dicom(plain)  # found by the DICM marker, no suffix
    img = read_image(plain, 3, 8)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint16
    small = read_image(plain, None, 4)[..., 0]
    assert small[1, 2] == 65535 and small[0, 0] == 0


def test_dicom_errors_never_show_patient_identifiers(tmp_path, caplog):
    raw = np.arange(64, dtype=np.uint16).reshape(8, 8)
    good = write_dicom(tmp_path / "good.dcm", raw)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[:-60])  # pixel data cut short
    with pytest.raises(DataError) as err:
        read_image(bad, None, 8)
    assert str(bad) in str(err.value)
    assert not any(s in str(err.value) for s in SECRETS)
    csv = tmp_path / "d.csv"
    csv.write_text("path,label\ngood.dcm,a\nbad.dcm,b\ngood2.dcm,b\n")
    shutil.copy(good, tmp_path / "good2.dcm")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(csv), image_size=8))
    assert "row 3" in str(err.value) and "bad.dcm" in str(err.value)
    assert not any(s in str(err.value) for s in SECRETS)
    caplog.set_level(logging.DEBUG)
    ds = load_source(DataConfig(source=str(csv), image_size=8, max_bad_files=1))
    assert ds.ids == ["good.dcm", "good2.dcm"] and ds.images.dtype == np.uint16
    assert "bad.dcm" in caplog.text and "row 3" in caplog.text
    assert not any(s in caplog.text for s in SECRETS)


def test_png_16bit_kept_16bit(tmp_path):
    a = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x16.png")
    img = read_image(tmp_path / "x16.png", None, 32)
    assert img.dtype == np.uint16 and np.array_equal(img[..., 0], a)
    small = read_image(tmp_path / "x16.png", 3, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint16 and small.max() > 255


def test_grey_rgb_conversions_and_modes(tmp_path):
    grey = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png", 3, 16)
    assert rgb.shape == (16, 16, 3) and (rgb == grey[..., None]).all()
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "c.bmp")
    g = read_image(tmp_path / "c.bmp", 1, 16)
    assert g.shape == (16, 16, 1) and int(g[0, 0, 0]) == round(0.299 * 200)
    Image.fromarray(np.dstack([colour, np.full((16, 16), 128, np.uint8)])).save(tmp_path / "a.png")  # RGBA
    assert read_image(tmp_path / "a.png", None, 8).shape == (8, 8, 3)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")  # grey palette -> grey
    assert read_image(tmp_path / "p.png", None, 16).shape == (16, 16, 1)
    Image.fromarray(grey.astype(np.int32) * 100, mode=None).convert("I").save(tmp_path / "i.tif")
    assert read_image(tmp_path / "i.tif", None, 16).dtype == np.uint16


# ------------------------------------------------------------------ bad input


def _tiny_csv(tmp_path: Path, rows: str, header: str = "path,label") -> Path:
    for k in range(3):
        Image.fromarray(np.full((8, 8), 50 * k, np.uint8)).save(tmp_path / f"{k}.png")
    csv = tmp_path / "t.csv"
    csv.write_text(header + "\n" + rows)
    return csv


def test_missing_file_names_row_and_file(tmp_path):
    csv = _tiny_csv(tmp_path, "0.png,a\nnope.png,b\n1.png,b\n")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(csv), image_size=8))
    msg = str(err.value)
    assert "row 3" in msg and "nope.png" in msg and "file not found" in msg
    assert "data.max_bad_files=1" in msg


@needs_ham
def test_truncated_jpeg_and_non_image(tmp_path):
    src = HAM / "images" / ham_slice(1).path[0]
    (tmp_path / "cut.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (tmp_path / "text.png").write_text("definitely not a PNG")
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg", None, 224)
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg", None, 28)
    with pytest.raises(DataError, match=r"text\.png.*not an image"):
        read_image(tmp_path / "text.png", None, 28)
    shutil.copy(src, tmp_path / "ok.jpg")
    csv = tmp_path / "t.csv"
    csv.write_text("path,label\nok.jpg,a\ncut.jpg,a\ntext.png,b\n")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(csv), image_size=28))
    msg = str(err.value)
    assert "row 3 (" in msg and "cut.jpg" in msg and "row 4 (" in msg and "text.png" in msg
    assert "set data.max_bad_files=2 to skip them" in msg


def test_max_bad_files_skips_under_cap(tmp_path, caplog):
    csv = _tiny_csv(tmp_path, "0.png,a\nnope.png,b\n1.png,b\n2.png,a\n")
    caplog.set_level(logging.WARNING, logger="diffmed.data")
    ds = load_source(DataConfig(source=str(csv), image_size=8, max_bad_files=1))
    assert ds.ids == ["0.png", "1.png", "2.png"] and ds.targets.tolist() == [0, 1, 0]
    assert ds.skipped == [{"id": "nope.png", "file": str(tmp_path / "nope.png"), "row": 3, "reason": "file not found"}]
    assert "nope.png" in caplog.text and "row 3" in caplog.text


def test_unknown_label_and_empty_class(tmp_path):
    csv = _tiny_csv(tmp_path, "0.png,a\n1.png,b\n2.png,c\n")
    with pytest.raises(DataError, match=r"row 4: label 'c' in column 'label' is not one of"):
        load_source(DataConfig(source=str(csv), image_size=8, class_names=["a", "b"]))
    with pytest.raises(DataError, match=r"\['d'\] have no images in .*t\.csv"):
        load_source(DataConfig(source=str(csv), image_size=8, class_names=["a", "b", "c", "d"]))
    minority = load_source(DataConfig(source=str(csv), image_size=8, class_names=["a", "b", "c", "d"]),
                           allow_empty_classes=True)  # e.g. a synthetic manifest, real class order
    assert minority.class_names == ["a", "b", "c", "d"] and minority.targets.tolist() == [0, 1, 2]
    one = _tiny_csv(tmp_path, "0.png,a\n1.png,a\n")
    with pytest.raises(DataError, match="single class"):
        load_source(DataConfig(source=str(one), image_size=8))


def test_missing_label_column_lists_columns(tmp_path):
    csv = _tiny_csv(tmp_path, "0.png,a\n1.png,b\n")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(csv), label_columns=["dx"]))
    assert "no column 'dx'" in str(err.value) and "['path', 'label']" in str(err.value) and "t.csv" in str(err.value)


def test_bad_split_value_names_row(tmp_path):
    csv = _tiny_csv(tmp_path, "0.png,a,train\n1.png,b,validation\n", header="path,label,split")
    with pytest.raises(DataError, match=r"row 3: split 'validation'.*train, val or test"):
        load_source(DataConfig(source=str(csv), split_column="split", image_size=8))


def test_duplicate_rows_and_missing_source(tmp_path):
    csv = _tiny_csv(tmp_path, "0.png,a\n1.png,b\n0.png,b\n")
    with pytest.raises(DataError, match="rows 2 and 4 both list '0.png'"):
        load_source(DataConfig(source=str(csv), image_size=8))
    with pytest.raises(DataError, match="not found"):
        load_source(DataConfig(source=str(tmp_path / "absent.npz")))
