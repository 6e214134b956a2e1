"""Where DiffMIC-v2's inference time goes: each component timed on its own, next to the baseline's forward.

Untrained models with the default parameters (timing does not depend on the weights), one CPU thread by default,
random inputs of the data's size, ``torch.utils.benchmark`` (warm-up, then the median of repeated runs). Rows:
the ResNet-18 baseline forward, the DCG global encoder (+ saliency and ROI crops), the DCG local encoder over the
K ROIs, the raw-image transformer and the ROI CNN of F, the label UNet over the DDIM steps, and the whole
``predict_logits``. Milliseconds per image, and as a multiple of the baseline.

    python benchmarks/diffmic_cost.py --image-size 28 --channels 1 --classes 2
    python benchmarks/diffmic_cost.py --image-size 64 --channels 3 --classes 7 --set global_backbone=resnet10t
    python benchmarks/diffmic_cost.py --image-size 64 --channels 3 --classes 7 --batch-size 64 \
        --set feature_encoders=own --tag own     # and feature_encoders=dcg --tag dcg
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils import benchmark

from diffmed.bench import markdown_table, settings_of, write_results
from diffmed.config import OptimConfig
from diffmed.data.types import TaskSpec
from diffmed.methods.registry import create_method
from diffmed.models import create_backbone


def ms_per_image(fn, n: int, min_run_time: float) -> float:
    with torch.no_grad():
        fn()  # warm-up
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median / n * 1e3


def components(method, images: torch.Tensor) -> dict:
    """name -> a callable running that component on ``images`` (its inputs precomputed once)."""
    dcg, p = method.dcg, method.params
    rois = dcg(images, local=False, rois=True).rois
    cond = method.condition(images)
    steps = p.inference_steps * p.n_samples

    def unet() -> None:
        y = torch.zeros(len(images) * p.n_samples, *cond.prior.shape[1:])
        t = torch.full((len(y), p.num_points, p.num_points), 500, dtype=torch.long)
        feats = cond.features.repeat_interleave(p.n_samples, 0)
        prior = cond.prior.repeat_interleave(p.n_samples, 0)
        for _ in range(p.inference_steps):
            method.denoiser(y, prior, feats, t)

    rows = {
        "DCG global encoder + saliency + ROI crops": lambda: dcg(images, local=False, rois=True),
        f"DCG local encoder ({p.num_rois} ROIs) + attention": lambda: dcg.local_logits(dcg.roi_embeddings(rois)),
    }
    if method.shared_encoders:
        out = dcg(images)
        rows["F: projections of the DCG features"] = lambda: method.image_features(images, out)
    else:
        rows[f"F: image transformer ({p.image_backbone})"] = lambda: method.image_proj(method.image_encoder(images))
        rows[f"F: ROI CNN ({p.roi_backbone}, {p.num_rois} ROIs)"] = \
            lambda: method.roi_proj(method.roi_encoder(rois.flatten(0, 1)))
    rows[f"label UNet x {steps} (width {p.unet_channels})"] = unet
    rows["whole predict_logits"] = lambda: method.predict_logits(images)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per row")
    ap.add_argument("--set", nargs="*", default=[], help="DiffMIC-v2 params as key=value (e.g. unet_channels=64)")
    ap.add_argument("--tag", default="", help="suffix of the output files (cost_<size>px_<tag>)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffmic")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = "binary" if args.classes == 2 else "multiclass"
    spec = TaskSpec(task, [f"c{i}" for i in range(args.classes)], args.channels, args.image_size)
    params = dict(kv.split("=", 1) for kv in args.set)
    method = create_method("diffmic_v2", spec, params, OptimConfig(), 1).eval()
    images = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size)
    baseline = create_backbone("resnet18", args.channels, args.classes, args.image_size).eval()
    base_ms = ms_per_image(lambda: baseline(images), len(images), args.min_run_time)
    rows = {"ResNet-18 baseline forward": base_ms}
    rows.update({name: ms_per_image(fn, len(images), args.min_run_time)
                 for name, fn in components(method, images).items()})
    tag = f"cost_{args.image_size}px" + (f"_{args.tag}" if args.tag else "")
    results = {"ms_per_image": rows, "settings": settings_of(args),
               "params": method.params.model_dump()}
    md = (f"# DiffMIC-v2 inference cost by component{' (' + ', '.join(args.set) + ')' if args.set else ''}, "
          f"{args.image_size} px, {args.channels} channel(s), "
          f"{args.classes} classes, batch {args.batch_size}, {args.threads} thread(s)\n\n"
          + markdown_table(["component", "ms / image", "x baseline"],
                           [[k, f"{v:.2f}", f"{v / base_ms:.2f}"] for k, v in rows.items()]))
    write_results(args.out, tag, results, md)
    print(md)


if __name__ == "__main__":
    main()
