"""Batching: padding collate, resumable (distributed) samplers, DataLoader construction.

Training order and augmentation are pure functions of ``(seed, epoch)``: the sampler shuffles
with a generator seeded by ``seed + epoch`` and hands each sample its own augmentation seed, so
the stream does not depend on the number of workers, and resuming at iteration ``k`` of an epoch
(``sampler.set_epoch(e, start_iter=k)``) yields exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from .coco import CocoDetection


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int = 32
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images zero-padded (bottom/right) to the batch's max size rounded up to
    ``size_divisor``. Returns ``images`` float32 (B, 3, Hp, Wp) and the list of targets, each with
    ``pad_shape`` (Hp, Wp) added. Zero is the mean colour after normalisation (mmdetection pads
    the normalised image with 0). Samples whose image is None (undecodable, dropped by the
    dataset) are left out; if none is left the result is ``(None, [])``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    batch = [b for b in batch if b[0] is not None]
    if not batch:
        return None, []
    h = max(int(img.shape[1]) for img, _ in batch)
    w = max(int(img.shape[2]) for img, _ in batch)
    if size_divisor > 1:
        h = int(math.ceil(h / size_divisor) * size_divisor)
        w = int(math.ceil(w / size_divisor) * size_divisor)
    images = batch[0][0].new_zeros((len(batch), 3, h, w))
    targets = []
    for i, (img, tgt) in enumerate(batch):
        images[i, :, : img.shape[1], : img.shape[2]] = img
        tgt = dict(tgt)
        tgt["pad_shape"] = (h, w)
        targets.append(tgt)
    return images, targets


class _Collate:
    """Picklable collate with a fixed ``size_divisor`` (for worker processes)."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, batch):  # noqa: D401
        return collate(batch, self.size_divisor)


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainSampler(Sampler):
    """Shuffling, distributed, resumable sampler yielding ``(index, aug_seed)`` pairs.

    Each epoch draws one global order from ``seed + epoch`` (identical on every rank), cut into
    *global batches* of ``world_size * batch_size`` samples; rank ``r`` takes elements
    ``r, r + world_size, ...`` of the order. So with ``batch_size`` per rank, global batch ``k``
    is the same set of samples (with the same augmentation seeds) whatever the world size, and
    all ranks run the same number of iterations (the order is padded by wrapping around, as
    ``DistributedSampler`` does).

    ``groups`` (optional, one int per sample, e.g. :attr:`CocoDetection.aspect_groups`): every
    global batch is drawn from a single group (mmdetection's ``GroupSampler``: landscape and
    portrait images are not mixed, so padding is small); each group is padded to whole global
    batches and the batches are shuffled.

    ``set_epoch(epoch, start_iter)`` skips the first ``start_iter`` batches of this rank
    (mid-epoch resume).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        groups: Sequence[int] | None = None,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError("TrainSampler needs a non-empty dataset")
        if groups is not None and len(groups) != dataset_len:
            raise ValueError(f"groups has {len(groups)} entries for {dataset_len} samples")
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.n = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_iter = 0
        chunk = self.world_size * batch_size
        self.chunk = chunk
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        if self.groups is None:
            self.total = int(math.ceil(self.n / chunk) * chunk)
        else:
            sizes = np.bincount(self.groups)
            self.total = int(sum(math.ceil(s / chunk) * chunk for s in sizes if s > 0))
        self.iters_per_epoch = self.total // chunk

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        if not 0 <= start_iter <= self.iters_per_epoch:
            raise ValueError(f"start_iter {start_iter} outside 0..{self.iters_per_epoch}")
        self.epoch = epoch
        self.start_iter = start_iter

    def _global_order(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        aug = rng.integers(0, 2**62, size=self.n)  # per-sample augmentation seeds
        if self.groups is None:
            order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            reps = int(math.ceil(self.total / self.n))
            return np.tile(order, reps)[: self.total], aug
        batches = []
        for g in np.unique(self.groups):
            idx = np.nonzero(self.groups == g)[0]
            if self.shuffle:
                idx = rng.permutation(idx)
            size = int(math.ceil(len(idx) / self.chunk) * self.chunk)
            idx = np.tile(idx, int(math.ceil(size / len(idx))))[:size]
            batches += list(idx.reshape(-1, self.chunk))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(batches), aug

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, aug = self._global_order()
        mine = order[self.rank :: self.world_size]
        start = self.start_iter * self.batch_size
        for pos, idx in enumerate(mine[start:], start=start):
            # the augmentation seed depends on the sample, its position and the epoch
            yield int(idx), int(aug[idx] ^ (pos * self.world_size + self.rank))

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_iter) * self.batch_size


class InferenceSampler(Sampler):
    """Sequential shard of ``range(dataset_len)`` for rank ``r``: ``r, r + world, ...``
    (no padding, so every image is evaluated exactly once across ranks)."""

    def __init__(
        self, dataset_len: int, rank: int | None = None, world_size: int | None = None
    ) -> None:
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.n = dataset_len

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _worker_init(worker_id: int) -> None:
    # Threads inside workers only compete with the main process on small machines.
    torch.set_num_threads(1)


def build_train_loader(
    dataset: CocoDetection,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    size_divisor: int = 32,
    rank: int | None = None,
    world_size: int | None = None,
    group_by_aspect: bool = False,
) -> tuple[DataLoader, TrainSampler]:
    """Training DataLoader (``batch_size`` per process) and its :class:`TrainSampler`.

    Iterating yields ``(images (B,3,Hp,Wp) float32, targets list[dict])``; the last batch of an
    epoch is full (the sampler pads by wrapping around). ``group_by_aspect``: batches hold only
    landscape or only portrait images.
    """
    sampler = TrainSampler(
        len(dataset),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        groups=dataset.aspect_groups if group_by_aspect else None,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(size_divisor),
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    return loader, sampler


def build_eval_loader(
    dataset: CocoDetection,
    batch_size: int = 1,
    num_workers: int = 2,
    size_divisor: int = 32,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Evaluation DataLoader over this rank's shard, in dataset order, no augmentation."""
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(size_divisor),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
