"""Data: load any source into a LabelledSet, resolve labels, split, and fingerprint it.

Imports here stay light (numpy, PIL); torch-based datasets live in ``diffmed.data.dataset``.
"""
from diffmed.data.check import check_dataset, fingerprint, format_fingerprint
from diffmed.data.images import read_image
from diffmed.data.labels import apply_label_policies, relabel_uncertain
from diffmed.data.sources import load_source
from diffmed.data.splits import load_splits, make_splits, resolve_splits, save_splits, subsample_train
from diffmed.data.types import LabelledSet, TaskSpec

__all__ = [
    "load_source", "apply_label_policies", "relabel_uncertain", "resolve_splits", "make_splits",
    "save_splits", "load_splits", "subsample_train", "fingerprint", "format_fingerprint",
    "check_dataset", "read_image", "LabelledSet", "TaskSpec",
]
