"""Training data of the segmentation networks: the on-disk sample cache, mask targets, and
the augmented, shuffled batches the loop consumes.

Training streams the samples once into a :class:`SampleCache` (each image resized so that its
longer side is at most ``max_side``, and its target), then trains from the cache: no more
than one image is in memory at a time. :class:`SegmentationTrainingSet` augments cached pairs
and :func:`make_batch_maker` batches them, both as pure functions of (seed, epoch, index).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unsup.base import check_image
from unsup.nn.losses import IGNORE

__all__ = ["SampleCache", "SegmentationTrainingSet", "make_batch_maker", "prepare_mask_item"]


def _data_signature(samples) -> dict | None:
    """What identifies a dataset's training targets, when ``samples`` is a lab dataset
    (``spec``, ``records``, ``class_names``); None for other iterables (nothing cheap to
    compare without loading them)."""
    records = getattr(samples, "records", None)
    if records is None:
        return None
    return {"spec": str(getattr(samples, "spec", "")),
            "ids": [str(getattr(r, "id", r)) for r in records],
            "class_names": list(getattr(samples, "class_names", None) or [])}


class SampleCache:
    """Samples resized to the working resolution, on disk, one file per image and target.

    Layout of ``directory``: ``meta.json`` (ids, shapes, scales, class pixel counts, a
    fingerprint of the build options, ``complete``), ``images/NNNNNN.npy`` (uint8 RGB),
    ``targets/NNNNNN.png`` (label maps, :data:`unsup.nn.losses.IGNORE` = void) and any
    method-specific files (``extra/NNNNNN.*``).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())

    def __len__(self) -> int:
        return len(self.meta["items"])

    @property
    def items(self) -> list[dict]:
        return self.meta["items"]

    def image_path(self, i: int) -> Path:
        return _item_path(self.directory, "images", i, ".npy")

    def target_path(self, i: int) -> Path:
        return _item_path(self.directory, "targets", i, ".png")

    def extra_path(self, i: int, suffix: str) -> Path:
        return _item_path(self.directory, "extra", i, suffix)

    def image(self, i: int) -> np.ndarray:
        return np.load(self.image_path(i), allow_pickle=False)

    def target(self, i: int) -> np.ndarray:
        from unsup.io import read_label_map

        return read_label_map(self.target_path(i))

    @classmethod
    def build(cls, samples, directory, *, max_side: int | None, fingerprint: dict,
              prepare, progress: bool = True, desc: str = "caching"):
        """Stream ``samples`` into ``directory`` (reusing a complete cache with the same
        fingerprint).

        ``prepare(sample, index, shape, cache_dir, small_image) -> dict`` stores the item's
        target (and extras) and returns JSON-able per-item metadata (merged into
        ``meta.json``).
        """
        from tqdm import tqdm

        from unsup.augment import resize_image, working_shape
        from unsup.io import atomic_write_bytes, atomic_write_path

        directory = Path(directory)
        meta_path = directory / "meta.json"
        # A cache is reused only for the same data: which images (ids), from where (spec),
        # and with which classes (a class restriction remaps the targets of the same ids).
        fingerprint = {**fingerprint, "data": _data_signature(samples)}
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        if meta_path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                meta = json.loads(meta_path.read_text())
                if meta.get("complete") and meta.get("fingerprint") == key:
                    return cls(directory)
        (directory / "images").mkdir(parents=True, exist_ok=True)
        items = []
        bar = tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False)
        for i, sample in enumerate(bar):
            image = check_image(sample.image)
            shape = working_shape(image.shape[:2], max_side)
            small = resize_image(image, shape)
            with atomic_write_path(_item_path(directory, "images", i, ".npy")) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(small), allow_pickle=False)
            info = {"id": sample.id, "shape": list(shape),
                    "original_shape": list(image.shape[:2])}
            info.update(prepare(sample, i, shape, directory, small) or {})
            items.append(info)
        if not items:
            raise ValueError("no training samples (the dataset is empty or every image "
                             "failed to load)")
        meta = {"fingerprint": key, "options": fingerprint, "items": items, "complete": True}
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
        return cls(directory)


def _item_path(directory, kind: str, i: int, suffix: str) -> Path:
    return Path(directory) / kind / f"{i:06d}{suffix}"


def _label_target(sample, shape) -> tuple[np.ndarray, int]:
    """The sample's first ground-truth map resized (nearest) to ``shape``, void -> IGNORE."""
    from unsup.augment import resize_labels

    if not sample.ground_truth:
        raise ValueError(f"{sample.path}: has no ground-truth mask; the supervised method "
                         "trains on masks: train it with `unsup train --method supervised "
                         "--data masks:IMAGES:MASKS --out MODEL` and segment with --model MODEL")
    labels = np.asarray(sample.ground_truth[0])
    void = labels == sample.ignore_index if sample.ignore_index is not None else None
    target = labels.astype(np.int64)
    if void is not None:
        target[void] = IGNORE
    valid = target[target != IGNORE]
    if valid.size and (valid.min() < 0 or valid.max() >= IGNORE):
        raise ValueError(f"{sample.path}: label {int(valid.max())} out of range 0..254; if it "
                         "marks void pixels give --ignore-index")
    target = resize_labels(target.astype(np.int32), shape)
    valid = target[target != IGNORE]
    return target.astype(np.uint8), int(valid.max()) if valid.size else 0


def prepare_mask_item(sample, index, shape, cache_dir, small_image) -> dict:
    """The ``prepare`` of :meth:`SampleCache.build` for mask targets: writes the sample's
    label map at the working resolution, returns its largest label and class pixel counts."""
    from unsup.io import write_label_map

    target, top = _label_target(sample, shape)
    write_label_map(_item_path(cache_dir, "targets", index, ".png"), target)
    counts = np.bincount(target[target != IGNORE].ravel(), minlength=top + 1)
    return {"max_label": top, "class_counts": counts.tolist()}


class SegmentationTrainingSet:
    """A torch-style dataset of augmented (image, target) crops, loaded one item at a time.

    Parameters
    ----------
    load_pair : callable
        ``load_pair(index) -> (image uint8 (H, W, 3), target int (H, W))``, reading from
        disk; targets use :data:`IGNORE` for pixels without a label.
    n_items : int
    crop_size : int
        Side of the square training crops.
    scale_range : (float, float)
        Random rescaling factor range applied before cropping.
    hflip : bool
        Random horizontal flips.
    color_jitter : float
        Strength of the brightness / contrast / saturation jitter (0 = none).
    seed : int

    Items are indexed by ``(epoch, index)`` so that the augmentation of an item is a pure
    function of (seed, epoch, index): the same in any order, on any worker, after a resume.
    """

    def __init__(self, load_pair: Callable[[int], tuple[np.ndarray, np.ndarray]], n_items: int,
                 *, crop_size: int = 224, scale_range=(0.7, 1.3), hflip: bool = True,
                 color_jitter: float = 0.2, seed: int = 0):
        self.load_pair = load_pair
        self.n_items = int(n_items)
        self.crop_size = int(crop_size)
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, key):
        import torch

        from unsup.augment import augment_pair

        epoch, index = key
        image, target = self.load_pair(int(index))
        rng = np.random.default_rng([self.seed, int(epoch), int(index), 0x5E6])
        image, target = augment_pair(image, target, rng=rng, crop_size=self.crop_size,
                                     scale_range=self.scale_range, hflip=self.hflip,
                                     color_jitter=self.color_jitter, ignore_index=IGNORE)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(target.astype(np.int64)))


class _BatchMaker:
    """``make_batches(epoch, start=0)`` over a :class:`SegmentationTrainingSet`."""

    def __init__(self, dataset: SegmentationTrainingSet, *, batch_size: int, seed: int,
                 num_workers: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        n = len(dataset)
        self.drop_last = drop_last and n >= batch_size
        self.steps_per_epoch = n // batch_size if self.drop_last else math.ceil(n / batch_size)

    def order(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([self.seed, int(epoch), 0xBA7C]).permutation(
            len(self.dataset))
        batches = [perm[i:i + self.batch_size].tolist()
                   for i in range(0, len(perm), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __call__(self, epoch: int, start: int = 0):
        import torch

        batches = [[(epoch, i) for i in b] for b in self.order(epoch)[start:]]
        if self.num_workers > 0:
            return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                               num_workers=self.num_workers)
        return ((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
                for items in ([self.dataset[k] for k in b] for b in batches))


def make_batch_maker(dataset: SegmentationTrainingSet, *, batch_size: int, seed: int,
                     num_workers: int = 0):
    """A ``make_batches(epoch, start=0)`` for :func:`train`: shuffled per (seed, epoch),
    uint8 image batches (N, 3, h, w) and int64 targets (N, h, w); ``steps_per_epoch`` set."""
    return _BatchMaker(dataset, batch_size=batch_size, seed=seed, num_workers=num_workers)
