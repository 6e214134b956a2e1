"""Quality of generated images: FID, KID, k-NN precision/recall, and SSIM/PSNR to the nearest real image.

Distribution metrics compare *features*, and numbers from different feature spaces are not comparable.
Every result therefore carries ``feature_space``: ``inception:torchvision-imagenet1k_v1`` when the
torchvision Inception-v3 ImageNet weights are already on disk (never downloaded here; note they are not
the TF-Inception weights of published FIDs), else ``domain:<backbone>:<hash>``, a small classifier trained
on the real training images whose hash covers the training ids, labels and settings (thesis Table 13-14
report FID/SSIM/PSNR; KID and precision/recall are added because FID is biased for the few hundred
images a minority class has).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from diffmed.errors import ConfigError

if TYPE_CHECKING:
    from diffmed.data.types import LabelledSet

log = logging.getLogger("diffmed.evaluation")

INCEPTION_TAG = "inception:torchvision-imagenet1k_v1"
INCEPTION_GLOB = "inception_v3_google-*.pth"
DOMAIN_BACKBONE = "resnet18"


# ------------------------------------------------------------------------------------------ distances
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance; got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; its singular-matrix warning is handled by the caller's check."""
    import warnings

    from scipy.linalg import LinAlgWarning, sqrtm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return sqrtm(a)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``sqrtm`` of a product of (near-)singular covariances (fewer images than feature dimensions) can
    come back inaccurate or non-finite: then ``eps * I`` is added to both covariances. Tiny imaginary
    parts from round-off are dropped; large ones raise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {s1.shape}, {s2.shape} do not match")
    product = s1 @ s2
    covmean = _sqrtm(product)
    err = np.linalg.norm(covmean @ covmean - product) / max(np.linalg.norm(product), 1e-30)
    if not np.isfinite(covmean).all() or err > 1e-3:
        offset = np.eye(len(s1)) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, averaged over
    ``subsets`` random subsets of ``min(subset_size, n1, n2)`` images per side; returns (mean, std)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per side; got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = m * (m - 1)
        values[s] = ((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                     - 2 * kxy.sum() / (m * m))
    return float(values.mean()), float(values.std())


def _kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(features) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return dist[:, k]  # column 0 is the point itself


def _inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each point: is it inside at least one ball (centre, radius)?"""
    from sklearn.metrics import pairwise_distances

    out = np.empty(len(points), bool)
    for start in range(0, len(points), chunk):
        d = pairwise_distances(points[start:start + chunk], centres)
        out[start:start + chunk] = (d <= radii[None, :]).any(1)
    return out


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    reaching each point's k-th nearest neighbour; precision = share of fakes inside the real manifold,
    recall = share of reals inside the fake manifold."""
    real, fake = np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"precision/recall needs at least 2 real and 2 generated images; got {len(real)}, {len(fake)}")
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k)).mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).mean()
    return float(precision), float(recall)


def to_float_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8/uint16 or float in [0, 1] -> float64 in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images / 255.0
    if images.dtype == np.uint16:
        return images / 65535.0
    return images.astype(np.float64)


def nearest_real_ssim_psnr(fake_images: np.ndarray, real_images: np.ndarray) -> dict:
    """For each generated image, the real image nearest in pixel L2 and SSIM / PSNR (dB) to it.

    Images are (N, H, W, C), compared in [0, 1] (``data_range=1``). Very high SSIM to the nearest real
    image flags memorisation; the thesis's Table 14 reports these as reconstruction metrics.
    Returns per-image ``nearest``, ``ssim``, ``psnr`` and their means and standard deviations.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from sklearn.neighbors import NearestNeighbors

    fake, real = to_float_images(fake_images), to_float_images(real_images)
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated images {fake.shape[1:]} and real images {real.shape[1:]} differ in shape")
    _, idx = NearestNeighbors(n_neighbors=1).fit(real.reshape(len(real), -1)).kneighbors(fake.reshape(len(fake), -1))
    nearest = idx[:, 0]
    side = min(fake.shape[1:3])
    win = 7 if side >= 7 else side - (1 - side % 2)  # skimage needs an odd window no larger than the image
    ssim = np.array([structural_similarity(real[j], f, data_range=1.0, channel_axis=-1, win_size=win)
                     for f, j in zip(fake, nearest)])
    with np.errstate(divide="ignore"):
        psnr = np.array([peak_signal_noise_ratio(real[j], f, data_range=1.0) for f, j in zip(fake, nearest)])
    finite = psnr[np.isfinite(psnr)]
    return {"nearest": nearest, "ssim": ssim, "psnr": psnr,
            "ssim_mean": float(ssim.mean()), "ssim_std": float(ssim.std()),
            "psnr_mean": float(finite.mean()) if finite.size else float("inf"),
            "psnr_std": float(finite.std()) if finite.size else 0.0,
            "n_identical": int(np.sum(~np.isfinite(psnr)))}


# ---------------------------------------------------------------------------------- feature extractors
class FeatureExtractor(Protocol):
    """Maps (N, H, W, C) images to (N, D) features; ``tag`` names the feature space."""

    tag: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(images: np.ndarray, batch_size: int):
    """(N, H, W, C) images -> (B, C, H, W) float tensors in [0, 1]."""
    for start in range(0, len(images), batch_size):
        chunk = to_float_images(images[start:start + batch_size]).astype(np.float32)
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2)


def find_inception_weights() -> Path | None:
    """torchvision's Inception-v3 weights in the torch hub cache ($TORCH_HOME/hub/checkpoints), if present."""
    found = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob(INCEPTION_GLOB))
    return found[0] if found else None


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception-v3 from a local weights file (grey -> 3 channels, 299 px)."""

    tag = INCEPTION_TAG

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None,
                 batch_size: int = 64) -> None:
        from torchvision.models import inception_v3

        path = Path(weights_path) if weights_path is not None else find_inception_weights()
        if path is None or not path.is_file():
            raise ConfigError(f"Inception-v3 weights not found ({weights_path or INCEPTION_GLOB} under "
                              f"{Path(torch.hub.get_dir()) / 'checkpoints'}); put the file there or use the "
                              "domain feature extractor")
        model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.fc = nn.Identity()
        self.device, self.batch_size = _pick_device(device), batch_size
        self.model = model.eval().to(self.device)
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for x in _batches(images, self.batch_size):
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
            out.append(self.model(((x - self.mean) / self.std).to(self.device)).float().cpu())
        return torch.cat(out).numpy()


class DomainFeatures:
    """Penultimate features of a classifier trained on the real training images (``domain:...`` space)."""

    def __init__(self, model: nn.Module, tag: str, info: dict, device: str | torch.device | None = None,
                 batch_size: int = 256) -> None:
        self.tag, self.info, self.batch_size = tag, dict(info), batch_size
        self.device = _pick_device(device)
        self.model = model.eval().to(self.device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for x in _batches(images, self.batch_size):
            x = ((x - 0.5) / 0.5).to(self.device)
            out.append(self.model.forward_head(self.model.forward_features(x), pre_logits=True).float().cpu())
        return torch.cat(out).numpy()

    def save(self, path: str | Path) -> None:
        """Weights as safetensors, with the tag and the architecture in the file's metadata."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path), metadata={"tag": self.tag, "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "DomainFeatures":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from diffmed.models import create_backbone

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        info = json.loads(meta["info"])
        model = create_backbone(info["backbone"], info["channels"], info["num_classes"], info["image_size"],
                                small_stem=True)
        model.load_state_dict(load_file(str(path)))
        return cls(model, meta["tag"], info, device)


def _training_hash(ids: Sequence[str] | None, images: np.ndarray, labels: np.ndarray, settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    if ids is not None:
        h.update("\n".join(map(str, ids)).encode())
    else:
        h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, np.int64).tobytes())
    return h.hexdigest()[:12]


def train_domain_feature_extractor(images: np.ndarray, labels: np.ndarray, epochs: int = 5, seed: int = 0,
                                   ids: Sequence[str] | None = None, backbone: str = DOMAIN_BACKBONE,
                                   batch_size: int = 128, lr: float = 1e-3,
                                   device: str | torch.device | None = None) -> DomainFeatures:
    """Train a small-stem classifier on REAL training images (class-weighted cross-entropy, Adam).

    Its penultimate features become the ``domain:<backbone>:<hash>`` feature space, the hash covering
    the training ids (or image bytes), labels and settings, so two reports share a tag only when they
    used the very same extractor.
    """
    from diffmed.models import create_backbone

    labels = np.asarray(labels).astype(np.int64)
    if len(labels) != len(images) or len(images) < 2:
        raise ValueError(f"need one label per image and at least 2 images; got {len(images)} images, "
                         f"{len(labels)} labels")
    num_classes = int(labels.max()) + 1
    settings = _domain_settings(labels, backbone, epochs, seed, batch_size, lr)
    info = {"backbone": backbone, "channels": int(images.shape[-1]), "num_classes": num_classes,
            "image_size": int(images.shape[1]), **settings}
    dev = _pick_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(backbone, info["channels"], num_classes, info["image_size"], small_stem=True).to(dev)
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)
    weights = torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32, device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = torch.from_numpy(to_float_images(images).astype(np.float32)).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(labels)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=order).split(batch_size):
            x, y = ((x_all[idx] - 0.5) / 0.5).to(dev), y_all[idx].to(dev)
            loss = nn.functional.cross_entropy(model(x), y, weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return DomainFeatures(model, domain_tag(images, labels, ids, backbone, epochs, seed, batch_size, lr), info, dev)


def _domain_settings(labels: np.ndarray, backbone: str, epochs: int, seed: int, batch_size: int, lr: float) -> dict:
    return {"backbone": backbone, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
            "num_classes": int(np.asarray(labels).astype(np.int64).max()) + 1}


def domain_tag(images: np.ndarray, labels: np.ndarray, ids: Sequence[str] | None = None,
               backbone: str = DOMAIN_BACKBONE, epochs: int = 5, seed: int = 0, batch_size: int = 128,
               lr: float = 1e-3) -> str:
    """The feature-space tag :func:`train_domain_feature_extractor` gives for these images and settings."""
    labels = np.asarray(labels).astype(np.int64)
    settings = _domain_settings(labels, backbone, epochs, seed, batch_size, lr)
    return f"domain:{backbone}:{_training_hash(ids, images, labels, settings)}"


def domain_extractor(images: np.ndarray, labels: np.ndarray, ids: Sequence[str] | None = None, epochs: int = 5,
                     seed: int = 0, cache: str | Path | None = None,
                     device: str | torch.device | None = None) -> DomainFeatures:
    """:func:`train_domain_feature_extractor`, reused from / saved to the safetensors file ``cache``.

    A cached extractor is reused only when its tag is the one these images, labels and settings give
    (so a file left by other data or other settings is retrained and replaced, never silently reused).
    """
    import os

    from safetensors import safe_open

    if cache is not None and Path(cache).is_file():
        with safe_open(str(cache), framework="pt") as f:
            cached_tag = (f.metadata() or {}).get("tag")
        if cached_tag == domain_tag(images, labels, ids, epochs=epochs, seed=seed):
            return DomainFeatures.load(cache, device)
        log.info("feature extractor %s was trained on other data or settings: retraining it", cache)
    fx = train_domain_feature_extractor(images, labels, epochs, seed, ids, device=device)
    if cache is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        fx.save(tmp)
        os.replace(tmp, cache)
    return fx


def default_extractor(real_images: np.ndarray, real_labels: np.ndarray, ids: Sequence[str] | None = None,
                      epochs: int = 5, seed: int = 0, prefer_inception: bool = True,
                      device: str | torch.device | None = None, cache: str | Path | None = None) -> FeatureExtractor:
    """Inception features when their weights are on disk (and preferred), else a domain extractor
    (trained on the real images, or reused from ``cache``: see :func:`domain_extractor`)."""
    if prefer_inception and find_inception_weights() is not None:
        return InceptionFeatures(device=device)
    if prefer_inception:
        log.info("Inception-v3 weights not in %s: using a domain feature extractor", torch.hub.get_dir())
    return domain_extractor(real_images, real_labels, ids, epochs, seed, cache, device)


# ------------------------------------------------------------------------------------------- report
def _metrics(real_f: np.ndarray, fake_f: np.ndarray, pixels: dict, k: int, kid_subsets: int,
             kid_subset_size: int, seed: int) -> dict:
    kid, kid_std = kernel_inception_distance(real_f, fake_f, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real_f, fake_f, k)
    return {"n_real": len(real_f), "n_fake": len(fake_f), "fid": fid_from_features(real_f, fake_f),
            "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall,
            "ssim": float(np.mean(pixels["ssim"])), "ssim_std": float(np.std(pixels["ssim"])),
            "psnr": _finite_mean(pixels["psnr"]), "psnr_std": _finite_std(pixels["psnr"]),
            "n_identical_to_real": int(np.sum(~np.isfinite(pixels["psnr"])))}


def _finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("inf")


def _finite_std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std()) if x.size else 0.0


def class_features(images_by_class: dict[str, np.ndarray], extractor: FeatureExtractor) -> dict[str, np.ndarray]:
    """Features of each class's images (compute the real ones once when scoring several generators)."""
    return {name: extractor(images) for name, images in images_by_class.items()}


def generation_report(real_by_class: dict[str, np.ndarray], fake_by_class: dict[str, np.ndarray],
                      extractor: FeatureExtractor, k: int = 3, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, seed: int = 0,
                      real_features: dict[str, np.ndarray] | None = None) -> dict:
    """FID, KID, precision, recall, SSIM and PSNR per class and overall, in one feature space.

    Images are (N, H, W, C) per class name. SSIM/PSNR compare each generated image with its nearest real
    image of the same class; "overall" pools the per-class features (FID/KID/precision/recall over all
    images) and the per-image SSIM/PSNR values. ``real_features`` (from :func:`class_features` with the
    same extractor) skips re-extracting the real images.
    """
    missing = [c for c in fake_by_class if c not in real_by_class]
    if missing:
        raise ValueError(f"generated classes {missing} have no real images to compare with")
    per_class, feats_r, feats_f, pix = {}, [], [], {"ssim": [], "psnr": []}
    for name, fake in fake_by_class.items():
        real = real_by_class[name]
        fr = real_features[name] if real_features is not None else extractor(real)
        ff = extractor(fake)
        pixels = nearest_real_ssim_psnr(fake, real)
        per_class[name] = _metrics(fr, ff, pixels, k, kid_subsets, kid_subset_size, seed)
        feats_r.append(fr), feats_f.append(ff)
        pix["ssim"].append(pixels["ssim"]), pix["psnr"].append(pixels["psnr"])
    overall = _metrics(np.concatenate(feats_r), np.concatenate(feats_f),
                       {key: np.concatenate(v) for key, v in pix.items()}, k, kid_subsets, kid_subset_size, seed)
    return {"feature_space": extractor.tag, "per_class": per_class, "overall": overall}


# ---------------------------------------------------------------------------------- generated sets
def images_by_class(ds: "LabelledSet", per_class: int | None = None) -> dict[str, np.ndarray]:
    """(N, H, W, C) images of each class of a single-label set (the first ``per_class`` of each)."""
    if ds.task == "multilabel":
        raise ConfigError("generation quality is measured per class of single-label data")
    targets = np.asarray(ds.targets).astype(int)
    return {name: ds.images[targets == k][:per_class] for k, name in enumerate(ds.class_names)}


def evaluate_generated(real_by_class: dict[str, np.ndarray], generated: "LabelledSet", extractor: FeatureExtractor,
                       per_class: int | None = None, seed: int = 0,
                       real_features: dict[str, np.ndarray] | None = None) -> dict:
    """:func:`generation_report` of a set of generated images (the first ``per_class`` of each class).

    Classes with fewer than 2 generated images (e.g. the majority class of a ``--balance-to`` manifest)
    are left out and listed under ``not_evaluated`` with their image count.
    """
    from diffmed.errors import DataError

    fake = images_by_class(generated, per_class)
    too_few = {name: len(images) for name, images in fake.items() if len(images) < 2}
    fake = {name: images for name, images in fake.items() if name not in too_few}
    if not fake:
        raise DataError(f"'{generated.source}' has fewer than 2 generated images in every class ({too_few}); "
                        "generation quality needs at least 2 per class")
    report = generation_report(real_by_class, fake, extractor, seed=seed, real_features=real_features)
    if too_few:
        report["not_evaluated"] = too_few
    return report


GENERATION_EVAL = "generation_eval"
"""Folder of a generator run holding ``diffmed generator eval``'s samples and feature extractor."""
FEATURE_CHOICES = ("auto", "domain", "inception")


def evaluate_generator(run_dir: str | Path, per_class: int | None = None, steps: int = 50, sampler: str = "ddim",
                       guidance: float = 1.0, seed: int = 0, synthetic: str | Path | None = None,
                       features: str = "auto", feature_epochs: int = 5, batch_size: int = 64,
                       out: str | Path | None = None, default_per_class: int = 100) -> dict:
    """``diffmed generator eval``: per-class quality of a generator run's images against its real training images.

    The generated images are ``per_class`` (default ``default_per_class``) images per class sampled with
    :func:`diffmed.diffusion.generate.generate` into ``RUN/generation_eval/<sampler><steps>-g<guidance>-s<seed>/``
    (resumable, reused), or read from an existing ``synthetic`` manifest. The reference is the real
    training split of the run (its ``config.yaml`` and ``splits.json``). ``features``: ``auto`` (Inception
    when its weights are on disk, else the domain extractor), ``domain`` (a classifier trained on the real
    training images, cached in ``RUN/generation_eval/``) or ``inception``. The report (see
    :func:`generation_report`, plus ``generator_run``, ``generated`` and ``feature_extractor``) is written
    as JSON to ``out`` (default ``RUN/generation_eval.json``) and returned.
    """
    from diffmed.augment.strategies import read_manifest
    from diffmed.config import load_config
    from diffmed.diffusion.generative import read_generator_meta
    from diffmed.engine.checkpoint import atomic_write_json
    from diffmed.engine.data import real_training_set
    from diffmed.engine.run import CONFIG_FILE

    if features not in FEATURE_CHOICES:
        raise ConfigError(f"--features '{features}' is not one of {', '.join(FEATURE_CHOICES)}")
    if per_class is not None and per_class < 2:
        raise ConfigError(f"--per-class {per_class}: generation metrics need at least 2 images per class")
    run_dir = Path(run_dir)
    meta = read_generator_meta(run_dir)
    run = next((d for d in (run_dir, run_dir.parent) if (d / CONFIG_FILE).is_file()), None)
    if run is None:
        raise ConfigError(f"'{run_dir}' is not a generator run folder (no {CONFIG_FILE}): give the folder "
                          "`diffmed generator train --out` wrote; its config and splits name the real training images")
    train = real_training_set(load_config(run / CONFIG_FILE), run)
    names = list(meta["spec"]["class_names"])
    if names != list(train.class_names):
        raise ConfigError(f"the generator's classes {names} differ from its training data's {list(train.class_names)}")
    work = run / GENERATION_EVAL
    if synthetic is not None:
        generated = read_manifest(synthetic, train)
        source = {"manifest": str(synthetic)}
    else:
        from diffmed.diffusion.generate import generate

        n = per_class or default_per_class
        res = generate(run, work / f"{sampler}{steps}-g{guidance:g}-s{seed}", per_class=n, steps=steps,
                       sampler=sampler, guidance=guidance, seed=seed, batch_size=batch_size)
        generated, per_class = read_manifest(res.manifest, train), n
        source = {"manifest": str(res.manifest), "per_class": n, "steps": steps, "sampler": sampler,
                  "guidance": guidance, "seed": seed, "images_per_second": res.images_per_second}
    if features == "inception":
        extractor: FeatureExtractor = InceptionFeatures()
    else:
        extractor = default_extractor(train.images, train.targets, train.ids, feature_epochs, seed,
                                      prefer_inception=features == "auto",
                                      cache=work / f"domain-e{feature_epochs}-s{seed}.safetensors")
    report = evaluate_generated(images_by_class(train), generated, extractor, per_class, seed)
    report.update({"generator_run": str(run), "generated": source,
                   "feature_extractor": getattr(extractor, "info", {"weights": str(find_inception_weights())})})
    atomic_write_json(Path(out) if out is not None else run / f"{GENERATION_EVAL}.json", report)
    return report
