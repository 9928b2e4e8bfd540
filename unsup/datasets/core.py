"""The dataset types: records, samples, boxes, and :class:`Dataset` with its views.

A :class:`Dataset` is an ordered list of lightweight records whose samples are loaded one at a
time. Its views (:meth:`Dataset.without_annotations`, :meth:`Dataset.boxes_only`,
:meth:`Dataset.restrict_classes`, :meth:`Dataset.split`) are new datasets over the same
files; none of them reads an image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unsup.io import ImageReadError, read_image

__all__ = ["Box", "Sample", "Record", "Dataset", "BoxesOnlyDataset", "DatasetError",
           "boxes_from_masks", "VOC_CLASSES"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


class DatasetError(ValueError):
    """A dataset spec or annotation file is unusable; the message says which and why."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates: ``x0 <= x < x1``, ``y0 <= y < y1``.

    ``label`` is the class id (as in the dataset's label maps); ``ignore`` marks crowd or
    "difficult" boxes whose region should be ignored rather than learned.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    label: int
    ignore: bool = False

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def as_int(self) -> tuple[int, int, int, int]:
        """Integer pixel bounds (x0, y0, x1, y1) covering the box."""
        return (int(np.floor(self.x0)), int(np.floor(self.y0)),
                int(np.ceil(self.x1)), int(np.ceil(self.y1)))


@dataclass
class Sample:
    """One loaded sample.

    Attributes
    ----------
    id : str
        Stable id (relative path without extension for folders, the file stem otherwise).
    image : ndarray of uint8, shape (H, W, 3)
    path : Path
        The image file.
    ground_truth : list of ndarray of int32, shape (H, W), or None
        One label map per annotator (BSDS has several, semantic datasets one). Pixels equal
        to ``ignore_index`` are void.
    boundaries : list of ndarray of bool, or None
        Human boundary maps when the annotation provides them (BSDS ``Boundaries``).
    boxes : list of Box, or None
    ignore_index : int or None
    """

    id: str
    image: np.ndarray
    path: Path
    ground_truth: list[np.ndarray] | None = None
    boundaries: list[np.ndarray] | None = None
    boxes: list[Box] | None = None
    ignore_index: int | None = None

    @property
    def label_map(self) -> np.ndarray | None:
        """The first (for semantic datasets: the only) ground-truth map."""
        return self.ground_truth[0] if self.ground_truth else None


@dataclass(frozen=True)
class Record:
    """What is needed to load one sample: its id, image file and annotation references."""

    id: str
    image_path: Path
    annotation: object = None


@dataclass
class Dataset:
    """An ordered, lazily loaded collection of samples.

    Iterating yields :class:`Sample` objects one at a time. ``iter_samples(on_error="skip")``
    skips unreadable samples and records ``(record, error)`` in ``errors``.
    """

    spec: str
    records: list[Record]
    kind: str = "folder"
    ignore_index: int | None = None
    class_names: list[str] | None = None
    has_ground_truth: bool = False
    has_boxes: bool = False
    _loader: object = field(default=None, repr=False)
    _box_source: object = field(default=None, repr=False)
    boxes_from_masks: bool = False

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def load(self, index: int | str | Record) -> Sample:
        """Load one sample by position, id or record.

        Raises
        ------
        ImageReadError
            The image file is unusable.
        DatasetError
            Its annotation is unusable.
        """
        record = self._record(index)
        image = read_image(record.image_path)
        gt, bnd, boxes = (None, None, None)
        if self._loader is not None:
            gt, bnd, boxes = self._loader(record, image.shape[:2])
        if gt is not None:
            for k, g in enumerate(gt):
                if g.shape != image.shape[:2]:
                    raise DatasetError(
                        f"{record.image_path}: ground truth {k} has shape {g.shape}, "
                        f"image is {image.shape[:2]}"
                    )
        if self._box_source is not None:
            boxes = self._box_source(record, image.shape[:2])
        if self.boxes_from_masks:
            if gt is None:
                raise DatasetError(f"{record.image_path}: boxes_from_masks needs ground truth")
            boxes = boxes_from_masks(gt[0], ignore_index=self.ignore_index)
        return Sample(
            id=record.id, image=image, path=record.image_path, ground_truth=gt,
            boundaries=bnd, boxes=boxes, ignore_index=self.ignore_index,
        )

    def _record(self, index) -> Record:
        if isinstance(index, Record):
            return index
        if isinstance(index, str):
            for r in self.records:
                if r.id == index:
                    return r
            raise KeyError(f"{self.spec}: no sample with id {index!r}")
        return self.records[index]

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples(on_error="raise")

    def iter_samples(self, *, on_error: str = "raise", errors: list | None = None):
        """Yield samples in order; ``on_error="skip"`` records failures instead of raising."""
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        for record in self.records:
            try:
                sample = self.load(record)
            except (ImageReadError, DatasetError) as exc:
                if on_error == "raise":
                    raise
                if errors is not None:
                    errors.append((record, exc))
                continue
            yield sample

    def without_annotations(self) -> Dataset:
        """The same images with ground truth and boxes dropped (for methods that must not see them)."""
        return Dataset(spec=self.spec, records=self.records, kind=self.kind,
                       class_names=self.class_names)

    def boxes_only(self) -> BoxesOnlyDataset:
        """The same samples with their boxes but never their masks (for box supervision)."""
        return BoxesOnlyDataset(self)

    def restrict_classes(self, classes: Sequence[str | int]) -> Dataset:
        """A view keeping only ``classes``: label maps and boxes are remapped.

        Parameters
        ----------
        classes : sequence of str or int
            Class names (looked up in ``class_names``) or label ids to keep. The kept classes
            become labels ``1..K`` in the given order; every other class becomes the
            background 0 (void stays void); boxes of other classes are dropped.

        Returns
        -------
        Dataset
            With ``class_names = ["background", *kept names]``.
        """
        names = list(self.class_names or [])
        ids = []
        for c in classes:
            if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
                if c not in names:
                    raise DatasetError(f"{self.spec}: unknown class {c!r}; classes are: "
                                       f"{', '.join(names) or '(no class names: use ids)'}")
                ids.append(names.index(c))
            else:
                ids.append(int(c))
        if not ids:
            raise DatasetError("restrict_classes: no class given")
        if len(set(ids)) != len(ids):
            raise DatasetError(f"restrict_classes: repeated class in {list(classes)}")
        if 0 in ids:
            raise DatasetError("restrict_classes: class 0 is the background, it is always kept")
        new_names = ["background"] + [names[i] if i < len(names) else str(i) for i in ids]
        mapping = {old: new for new, old in enumerate(ids, start=1)}
        void = self.ignore_index

        def remap(labels: np.ndarray) -> np.ndarray:
            out = np.zeros_like(labels)
            for old, new in mapping.items():
                out[labels == old] = new
            if void is not None:
                out[labels == void] = void
            return out

        inner_loader, inner_boxes = self._loader, self._box_source

        def loader(record, shape):
            gt, bnd, boxes = inner_loader(record, shape)
            if gt is not None:
                gt = [remap(g) for g in gt]
            return gt, bnd, _remap_boxes(boxes, mapping)

        def box_source(record, shape):
            return _remap_boxes(inner_boxes(record, shape), mapping)

        return dataclasses.replace(self, class_names=new_names,
                                   _loader=loader if inner_loader is not None else None,
                                   _box_source=box_source if inner_boxes is not None else None)

    def split(self, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split the records into (train, held-out) views, deterministically.

        A permutation seeded by ``seed`` picks ``round(fraction * n)`` records (at least one,
        at most n - 1) for the held-out part; both parts keep the dataset's order.
        """
        n = len(self.records)
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        if n < 2:
            raise ValueError(f"{self.spec}: cannot split {n} image(s)")
        k = min(max(int(round(fraction * n)), 1), n - 1)
        held = set(np.random.default_rng([int(seed), 0x5917]).permutation(n)[:k].tolist())
        return (dataclasses.replace(self, records=[r for i, r in enumerate(self.records)
                                                   if i not in held]),
                dataclasses.replace(self, records=[r for i, r in enumerate(self.records)
                                                   if i in held]))


class BoxesOnlyDataset:
    """A dataset view whose samples carry the image and boxes but never masks.

    Made by :meth:`Dataset.boxes_only` (boxes from an annotation file, the dataset's own
    boxes, or ``boxes_from_masks``): every loaded sample has ``ground_truth`` and
    ``boundaries`` set to None, so a box-supervised method cannot see the masks.
    """

    def __init__(self, dataset: Dataset):
        if not getattr(dataset, "has_boxes", False):
            raise ValueError(
                f"{getattr(dataset, 'spec', dataset)}: has no boxes; give boxes=PATH "
                "(--boxes) or boxes_from_masks=True (--boxes-from-masks)")
        self.dataset = dataset
        self.spec = dataset.spec
        self.records = dataset.records
        self.kind = dataset.kind
        self.class_names = dataset.class_names
        self.ignore_index = dataset.ignore_index
        self.has_ground_truth = False
        self.has_boxes = True

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def ids(self) -> list[str]:
        return self.dataset.ids

    def load(self, index) -> Sample:
        sample = self.dataset.load(index)
        return dataclasses.replace(sample, ground_truth=None, boundaries=None)

    def iter_samples(self, *, on_error: str = "raise", errors: list | None = None):
        for sample in self.dataset.iter_samples(on_error=on_error, errors=errors):
            yield dataclasses.replace(sample, ground_truth=None, boundaries=None)

    def __iter__(self):
        return self.iter_samples(on_error="raise")


def _remap_boxes(boxes, mapping):
    if boxes is None:
        return None
    return [dataclasses.replace(b, label=mapping[b.label]) for b in boxes if b.label in mapping]


def boxes_from_masks(labels: np.ndarray, *, ignore_index: int | None = None,
                     background: int = 0) -> list[Box]:
    """Tight box around each connected component of each class of a label map.

    ``background`` and ``ignore_index`` get no boxes. Components use 8-connectivity.
    """
    from scipy import ndimage

    boxes = []
    for cls in np.unique(labels):
        if cls == background or (ignore_index is not None and cls == ignore_index):
            continue
        comp, n = ndimage.label(labels == cls, structure=np.ones((3, 3), bool))
        for sl in ndimage.find_objects(comp):
            if sl is None:
                continue
            boxes.append(Box(float(sl[1].start), float(sl[0].start), float(sl[1].stop),
                             float(sl[0].stop), int(cls)))
    return boxes
