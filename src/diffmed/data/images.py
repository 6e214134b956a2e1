"""Reading one image file (PNG/JPEG/TIFF/BMP or DICOM) into a fixed-size integer array.

Everything downstream sees (size, size, C) arrays: uint8 for 8-bit sources, uint16 for 16-bit grey
sources and all grey DICOM, so that the extra depth of X-ray/CT data is not thrown away before the
model sees it. Error messages name the file only: DICOM headers carry patient identifiers, and no
header value is ever copied into a message or a log line.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffmed.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
"""File suffixes treated as images when scanning folders (files with the DICM marker count too)."""

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, the weights PIL uses for RGB -> L


class ImageReadError(DataError):
    """An image that could not be read; ``reason`` is the short cause without the path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image '{path}': {reason}")


def is_dicom(path: str | Path) -> bool:
    """DICOM by suffix, or by the 'DICM' marker at byte 128 (DICOM files often have no suffix)."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path, channels: int | None, size: int,
               dicom_window: tuple[float, float] | None = None) -> np.ndarray:
    """(size, size, C) uint8/uint16 array; C = ``channels``, or the file's own (grey 1, colour 3).

    Raises ImageReadError (a DataError) naming the file for a missing, truncated, corrupt or
    non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found" if not path.exists() else "not a file")
    arr = _read_dicom(path, dicom_window) if is_dicom(path) else _read_pil(path, size)
    return convert_channels(resize_array(arr, size), channels)


def _read_pil(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and min(img.size) >= 2 * size:
                # decode at a reduced DCT scale (still >= size): several times faster on big JPEGs
                img.draft(img.mode, (size, size))
            img.load()  # force the full decode so truncated files fail here, not later
            if img.getexif().get(0x0112, 1) != 1:  # camera orientation tag
                img = ImageOps.exif_transpose(img)
            return pil_to_array(img)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"corrupt or truncated image ({err})") from None


def pil_to_array(img: Image.Image) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB array; 16-bit grey stays uint16, alpha is dropped."""
    mode = img.mode
    if mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
            return a.astype(np.uint16)
        return _to_uint16(a.astype(np.float64), float(a.min()), float(a.max()))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in ("P", "PA") and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()  # a grey palette is a grey image
    return rgb


def _to_uint16(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] onto [0, 65535], clipped; a flat image maps to 0."""
    if hi <= lo:
        return np.zeros(x.shape, np.uint16)
    return np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 65535).astype(np.uint16)


def _read_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    """Grey DICOM -> uint16 over the window; colour DICOM -> uint8 RGB (no windowing applies)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():  # pydicom's value warnings may quote header values (names, ids)
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=path.suffix.lower() in (".dcm", ".dicom"))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
            raise ImageReadError(path, f"not a readable DICOM file ({type(err).__name__})") from None
        if "PixelData" not in ds:
            raise ImageReadError(path, "DICOM file has no pixel data")
        try:
            arr = ds.pixel_array
        except Exception as err:  # decoder missing, truncated pixel data, bad header geometry
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            hint = f"transfer syntax {getattr(syntax, 'name', syntax)}" if syntax else "unknown transfer syntax"
            raise ImageReadError(path, f"cannot decode DICOM pixel data ({type(err).__name__}, {hint}; "
                                       "compressed DICOM needs pylibjpeg or gdcm installed)") from None
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            arr = arr[0]  # multi-frame: the first frame stands for the image
        if samples == 3:
            return _colour_dicom(arr)
        x = arr.astype(np.float64) * _number(ds.get("RescaleSlope"), 1.0) + _number(ds.get("RescaleIntercept"), 0.0)
        center, width = window if window is not None else (_number(ds.get("WindowCenter"), None),
                                                            _number(ds.get("WindowWidth"), None))
        if center is not None and width is not None and width > 0:
            lo, hi = center - width / 2.0, center + width / 2.0
        else:
            lo, hi = float(x.min()), float(x.max())
        out = _to_uint16(x, lo, hi)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            out = 65535 - out  # MONOCHROME1: low values are white
        return out


def _colour_dicom(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    return (_to_uint16(arr.astype(np.float64), float(arr.min()), float(arr.max())) // 257).astype(np.uint8)


def _number(value, default: float | None) -> float | None:
    """DICOM DS/IS value (possibly multi-valued: take the first) as a float."""
    if value is None or value == "":
        return default
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return default
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of (H, W) or (H, W, C) to (size, size); no crop, no-op if equal."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    resample = Image.Resampling.BILINEAR
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] in (1, 3)):
        squeeze = arr.ndim == 3 and arr.shape[2] == 1
        out = np.asarray(Image.fromarray(arr[..., 0] if squeeze else arr).resize((size, size), resample))
        return out[..., None] if squeeze else out
    # 16-bit (or unusual channel counts): resize each channel in float so no depth is lost
    planes = arr[..., None] if arr.ndim == 2 else arr
    maxv = np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else None
    out = np.stack([np.asarray(Image.fromarray(planes[..., c].astype(np.float32))
                               .resize((size, size), resample)) for c in range(planes.shape[2])], axis=-1)
    if maxv is not None:
        out = np.clip(np.round(out), 0, maxv)
    out = out.astype(arr.dtype)
    return out[..., 0] if arr.ndim == 2 else out


def convert_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
    """(..., H, W) or (..., H, W, C) -> (..., H, W, channels): grey repeated to RGB, RGB to luma.

    Works on one image or a stack; a 2-D input is always one grey image.
    """
    if arr.ndim == 2:
        arr = arr[..., None]
    have = arr.shape[-1]
    if channels is None or channels == have:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if have == 3 and channels == 1:
        maxv = np.iinfo(arr.dtype).max
        grey = np.clip(np.round(arr.astype(np.float32) @ _LUMA.astype(np.float32)), 0, maxv)
        return grey.astype(arr.dtype)[..., None]
    raise DataError(f"cannot convert a {have}-channel image to {channels} channels; use channels 1 or 3")
