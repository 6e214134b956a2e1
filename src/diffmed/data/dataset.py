"""Torch datasets and the Lightning DataModule over a split LabelledSet."""
from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffmed.data.types import LabelledSet, TaskSpec


def to_tensor(images: np.ndarray, max_value: int) -> torch.Tensor:
    """(N, H, W, C) integers -> (N, C, H, W) float in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images).astype(np.float32) / max_value)
    return x.permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class ImageDataset(Dataset):
    """Items are dicts: image (C,H,W normalised), target, mask, index (row in the set)."""

    def __init__(self, ds: LabelledSet, spec: TaskSpec, transform: Callable | None = None) -> None:
        self.ds, self.spec, self.transform = ds, spec, transform
        self.targets = torch.as_tensor(ds.targets, dtype=torch.float32 if spec.multilabel else torch.long)
        mask = ds.mask if ds.mask is not None else np.ones(ds.targets.shape, np.float32)
        self.mask = torch.as_tensor(mask, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        x = to_tensor(self.ds.images[i : i + 1], self.ds.max_value)[0]
        if self.transform is not None:
            x = self.transform(x)
        return {"image": normalize(x, self.spec), "target": self.targets[i], "mask": self.mask[i], "index": i}


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced) order that depends only on (seed, epoch).

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint sees exactly the
    batches an uninterrupted run would have seen. ``loader_generator`` seeds the workers the same way.
    """

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader_generator.manual_seed(self._seed(1))

    def _seed(self, stream: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7919 + stream) % (2**63)

    def __iter__(self):
        g = torch.Generator().manual_seed(self._seed(0))
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        rank, world = _rank_and_world()
        order = torch.cat([order, order[: len(self) * world - self.n]])  # equal shards under DDP
        return iter(order[rank::world].tolist())

    def __len__(self) -> int:
        return -(-self.n // _rank_and_world()[1])


def _rank_and_world() -> tuple[int, int]:
    """Shard the epoch's order ourselves under DDP, so resumable ordering holds there too."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def balanced_weights(ds: LabelledSet) -> np.ndarray:
    """Per-row sampling weights giving every class the same expected share (single-label)."""
    counts = np.maximum(ds.class_counts(), 1)
    return 1.0 / counts[ds.targets.astype(int)]


class DataModule(L.LightningDataModule):
    """Train/val/test loaders over already-split sets; the sampler makes epochs resumable."""

    def __init__(self, sets: dict[str, LabelledSet], spec: TaskSpec, batch_size: int, seed: int,
                 train_transform: Callable | None = None, num_workers: int = 0,
                 balanced_sampling: bool = False) -> None:
        super().__init__()
        self.sets, self.spec, self.batch_size, self.seed = sets, spec, batch_size, seed
        self.train_transform, self.num_workers, self.balanced = train_transform, num_workers, balanced_sampling

    def dataset(self, split: str, augment: bool = False) -> ImageDataset:
        return ImageDataset(self.sets[split], self.spec, self.train_transform if augment else None)

    def _loader(self, ds: Dataset, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, shuffle=False, num_workers=self.num_workers,
            generator=sampler.loader_generator if sampler else None,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        train = self.sets["train"]
        weights = balanced_weights(train) if self.balanced and not self.spec.multilabel else None
        return self._loader(self.dataset("train", augment=True), EpochSampler(len(train), self.seed, weights))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"))

    def eval_loader(self, split: str) -> DataLoader:
        return self._loader(self.dataset(split))
