"""Dataset sources: the folder, label-map, BSDS500, PASCAL VOC and COCO readers, the box
files (VOC XML, COCO json, CSV), and :func:`open_dataset`, which turns a spec into a
:class:`unsup.datasets.Dataset`."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from unsup.datasets.core import (
    VOC_CLASSES,
    Box,
    Dataset,
    DatasetError,
    Record,
)
from unsup.io import IMAGE_EXTENSIONS, ImageReadError, read_json, read_label_map

__all__ = ["open_dataset", "load_bsds_ground_truth", "MAX_LABEL", "RUN_MARKER",
           "RUN_OUTPUT_FOLDERS", "BOX_CLASS_RANGE"]

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


#: Largest class id a ground-truth label map may hold (what a 16-bit label PNG stores).
MAX_LABEL = 65535
#: A folder holding this file is the output of an unsup run, never an input.
RUN_MARKER = "run.json"
#: What a run writes beside its run.json (left out when the input folder is itself an output).
RUN_OUTPUT_FOLDERS = ("labels", "overlays", "hierarchy")


def _input_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted, leaving out the outputs of unsup runs.

    A sub-folder holding a ``run.json`` is an output tree and is skipped whole; when ``root``
    itself holds one (``--out`` equal to the input), the folders a run writes are skipped.
    Either way one warning says what was left out, so that rerunning a command whose output
    lies inside its input never reads its own results back as images.
    """
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames.sort()
        if (here / RUN_MARKER).is_file():
            if here != root:
                skipped.append(here)
                dirnames.clear()
                continue
            skipped.extend(here / n for n in dirnames if n in RUN_OUTPUT_FOLDERS)
            dirnames[:] = [n for n in dirnames if n not in RUN_OUTPUT_FOLDERS]
        files.extend(here / f for f in filenames if not f.startswith("."))
    if skipped:
        names = ", ".join(p.relative_to(root).as_posix() for p in skipped[:3])
        warnings.warn(f"{root}: left out {len(skipped)} folder(s) written by unsup runs "
                      f"({names}{', ...' if len(skipped) > 3 else ''}); they are outputs, "
                      "not inputs", stacklevel=3)
    return sorted(files, key=lambda p: p.as_posix())


def _list_images(directory: Path) -> list[Path]:
    return [p for p in _input_files(directory) if _is_image(p)]


def _stem_index(directory: Path, exts=None) -> dict[str, Path]:
    index = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and (exts is None or p.suffix.lower() in exts):
            rel = p.relative_to(directory).with_suffix("").as_posix()
            index.setdefault(rel, p)
    return index


def _clip_boxes(boxes, shape, source, class_ids=None) -> list[Box]:
    """Clip boxes to the image; report and skip zero-area and unknown-class boxes."""
    h, w = shape
    kept = []
    for b in boxes:
        if class_ids is not None and b.label not in class_ids:
            warnings.warn(f"{source}: box {b} has unknown class {b.label}; skipped", stacklevel=3)
            continue
        x0, y0 = min(max(b.x0, 0.0), w), min(max(b.y0, 0.0), h)
        x1, y1 = min(max(b.x1, 0.0), w), min(max(b.y1, 0.0), h)
        if (x0, y0, x1, y1) != (b.x0, b.y0, b.x1, b.y1):
            warnings.warn(f"{source}: box {b} extends outside the {w}x{h} image; clipped",
                          stacklevel=3)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            warnings.warn(f"{source}: box {b} has zero area (after clipping); skipped",
                          stacklevel=3)
            continue
        kept.append(Box(x0, y0, x1, y1, b.label, b.ignore))
    return kept


# ---------------------------------------------------------------------------------------------
# box sources


def _voc_xml_boxes(path: Path, class_ids: dict[str, int]) -> list[Box]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable VOC XML ({exc})") from None
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        if name not in class_ids:
            warnings.warn(f"{path}: object of unknown class {name!r}; skipped", stacklevel=2)
            continue
        try:
            # VOC coordinates are 1-based and inclusive
            x0 = float(bb.findtext("xmin")) - 1
            y0 = float(bb.findtext("ymin")) - 1
            x1 = float(bb.findtext("xmax"))
            y1 = float(bb.findtext("ymax"))
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: malformed bndbox for {name!r}") from None
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        boxes.append(Box(x0, y0, x1, y1, class_ids[name], ignore=difficult))
    return boxes


#: Box class ids a label map can hold: 0 is the background and 255 marks void pixels.
BOX_CLASS_RANGE = (1, 254)


class _CsvBoxes:
    """Boxes from a CSV with header ``image,x0,y0,x1,y1,label`` (image = id, stem or file name).

    ``label`` is a class name (of the dataset's classes) or a numeric class id in
    ``BOX_CLASS_RANGE``. Numeric ids of a dataset without class names that are not
    contiguous (``1, 7``) are mapped, in increasing order, to ``1..K`` with a warning, and
    :attr:`class_names` records the mapping, so that a stray id never adds empty classes.
    """

    FIELDS = ("image", "x0", "y0", "x1", "y1", "label")

    def __init__(self, path: Path, class_names: list[str] | None):
        self.path = path
        self.class_names = class_names
        self.by_key: dict[str, list[Box]] = {}
        names = {n: i for i, n in enumerate(class_names or [])}
        numeric: dict[int, int] = {}  # id -> first line, to report and map
        try:
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or not set(self.FIELDS) <= set(reader.fieldnames):
                    raise DatasetError(
                        f"{path}: CSV boxes need the header image,x0,y0,x1,y1,label; "
                        f"got {reader.fieldnames}"
                    )
                for line, row in enumerate(reader, start=2):
                    missing = [k for k in self.FIELDS if not (row.get(k) or "").strip()]
                    if missing:
                        raise DatasetError(f"{path}:{line}: missing value(s) for "
                                           f"{', '.join(missing)} (a row needs "
                                           f"{','.join(self.FIELDS)})")
                    lab = row["label"].strip()
                    if lab.lstrip("-").isdigit():
                        label = int(lab)
                        low, high = BOX_CLASS_RANGE
                        if class_names and not 0 < label < len(class_names):
                            raise DatasetError(
                                f"{path}:{line}: class id {label} is not one of the dataset's "
                                f"classes 1..{len(class_names) - 1}")
                        if not low <= label <= high:
                            raise DatasetError(
                                f"{path}:{line}: class id {label} is outside {low}..{high} "
                                "(0 is the background, 255 marks void pixels)")
                        numeric.setdefault(label, line)
                    elif lab in names:
                        label = names[lab]
                    else:
                        warnings.warn(f"{path}:{line}: unknown class {lab!r}; skipped",
                                      stacklevel=2)
                        continue
                    coords = []
                    for k in ("x0", "y0", "x1", "y1"):
                        try:
                            value = float(row[k])
                        except ValueError:
                            raise DatasetError(f"{path}:{line}: {k} = {row[k].strip()!r} is not "
                                               "a number") from None
                        if not np.isfinite(value):
                            raise DatasetError(f"{path}:{line}: {k} = {row[k].strip()} is not a "
                                               "finite number")
                        coords.append(value)
                    key = Path(row["image"].strip()).with_suffix("").as_posix()
                    self.by_key.setdefault(key, []).append(Box(*coords, label))
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read CSV boxes ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not a text CSV file ({exc.reason})") from None
        except csv.Error as exc:
            raise DatasetError(f"{path}: malformed CSV ({exc})") from None
        if numeric and not class_names:
            self._make_contiguous(sorted(numeric))

    def _make_contiguous(self, ids: list[int]) -> None:
        mapping = {old: new for new, old in enumerate(ids, start=1)}
        if any(old != new for old, new in mapping.items()):
            moved = ", ".join(f"{o} -> {n}" for o, n in mapping.items() if o != n)
            warnings.warn(f"{self.path}: box class ids {', '.join(map(str, ids))} are not "
                          f"contiguous; mapped to 1..{len(ids)} ({moved}); the dataset's class "
                          "names record the original ids", stacklevel=3)
            self.by_key = {key: [dataclasses.replace(b, label=mapping[b.label]) for b in boxes]
                           for key, boxes in self.by_key.items()}
        self.class_names = ["background"] + [str(i) for i in ids]

    def unmatched(self, records: list[Record]) -> list[str]:
        """The image keys of the CSV that name no record of the dataset."""
        known = {r.id for r in records} | {r.image_path.stem for r in records}
        return sorted(k for k in self.by_key if k not in known)

    def __call__(self, record: Record, shape) -> list[Box]:
        raw = self.by_key.get(record.id) or self.by_key.get(record.image_path.stem, [])
        return _clip_boxes(raw, shape, f"{self.path} [{record.id}]")


# ---------------------------------------------------------------------------------------------
# dataset kinds


def _folder(path: Path, spec: str) -> Dataset:
    if path.is_file():
        return Dataset(spec=spec, records=[Record(path.stem, path)], kind="folder")
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or directory")
    records = [Record(p.relative_to(path).with_suffix("").as_posix(), p)
               for p in _input_files(path)
               if p.suffix.lower() in IMAGE_EXTENSIONS or _looks_like_input(p)]
    if not records:
        raise DatasetError(f"{path}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return Dataset(spec=spec, records=_disambiguate(records, path), kind="folder")


def _disambiguate(records: list[Record], root: Path) -> list[Record]:
    """Keep ids unique: files sharing a stem (a.jpg, a.png) keep their extension in the id."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.id] = counts.get(r.id, 0) + 1
    clashes = sorted(i for i, c in counts.items() if c > 1)
    if not clashes:
        return records
    warnings.warn(f"{root}: several files share the id(s) {clashes[:5]}; their ids keep the "
                  "file extension (e.g. 'a.jpg', 'a.png')", stacklevel=3)
    return [Record(r.image_path.relative_to(root).as_posix(), r.image_path, r.annotation)
            if counts[r.id] > 1 else r for r in records]


def _looks_like_input(path: Path) -> bool:
    # Files with unknown extensions are skipped silently, except extension-less files, which are
    # kept so that a mis-named image gets a clear read error instead of vanishing.
    return path.suffix == ""


def _masks(images: Path, masks: Path, spec: str, ignore_index) -> Dataset:
    for d in (images, masks):
        if not d.is_dir():
            raise DatasetError(f"{d}: not a directory (spec {spec!r})")
    mask_index = _stem_index(masks, {".png", ".tif", ".tiff", ".bmp"})
    records, missing = [], []
    for p in _list_images(images):
        key = p.relative_to(images).with_suffix("").as_posix()
        m = mask_index.get(key) or mask_index.get(p.stem)
        if m is None:
            missing.append(key)
            continue
        records.append(Record(key, p, m))
    if missing:
        warnings.warn(f"{masks}: no mask for {len(missing)} image(s), e.g. {missing[:3]}; "
                      "those images are left out", stacklevel=3)
    if not records:
        raise DatasetError(f"{spec}: no image has a matching mask (matched by file stem)")

    def loader(record, shape):
        try:
            labels = read_label_map(record.annotation)
        except ImageReadError as exc:
            raise DatasetError(str(exc)) from None
        bad = labels[(labels < 0) | (labels > MAX_LABEL)]
        if bad.size:
            values = ", ".join(map(str, np.unique(bad)[:5]))
            raise DatasetError(f"{record.annotation}: label value(s) {values} outside "
                               f"0..{MAX_LABEL}; ground-truth values are class ids (or the "
                               "void index), which label maps store in 16 bits")
        return [labels], None, None

    return Dataset(spec=spec, records=records, kind="masks", ignore_index=ignore_index,
                   has_ground_truth=True, _loader=loader)


def load_bsds_ground_truth(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All annotators' segmentations (int32) and boundary maps (bool) from a BSDS ``.mat``."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        cells = mat["groundTruth"]
        segs, bnds = [], []
        for k in range(cells.shape[1]):
            entry = cells[0, k]
            segs.append(np.asarray(entry["Segmentation"][0, 0]).astype(np.int32))
            bnds.append(np.asarray(entry["Boundaries"][0, 0]).astype(bool))
    except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: not a BSDS groundTruth .mat ({exc})") from None
    if not segs:
        raise DatasetError(f"{path}: ground truth has no annotators")
    return segs, bnds


def _bsds(root: Path, split: str, spec: str) -> Dataset:
    img_dir, gt_dir = root / "images" / split, root / "groundTruth" / split
    if not img_dir.is_dir():
        raise DatasetError(f"{spec}: {img_dir} does not exist (is --split {split!r} right?)")
    gts = {p.stem: p for p in gt_dir.glob("*.mat")} if gt_dir.is_dir() else {}
    records = [Record(p.stem, p, gts.get(p.stem)) for p in sorted(img_dir.glob("*.jpg"))]
    if not records:
        raise DatasetError(f"{img_dir}: no .jpg images")

    def loader(record, shape):
        if record.annotation is None:
            return None, None, None
        segs, bnds = load_bsds_ground_truth(record.annotation)
        return segs, bnds, None

    return Dataset(spec=spec, records=records, kind="bsds500", ignore_index=None,
                   has_ground_truth=bool(gts), _loader=loader)


def _voc(root: Path, split: str, spec: str) -> Dataset:
    if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        root = root / "VOC2012"
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if list_file.is_file():
        ids = [s.strip() for s in list_file.read_text().split() if s.strip()]
    else:
        seg = root / "SegmentationClass"
        if not seg.is_dir():
            raise DatasetError(f"{spec}: neither {list_file} nor {seg} exists")
        ids = sorted(p.stem for p in seg.glob("*.png"))
    class_ids = {n: i for i, n in enumerate(VOC_CLASSES)}
    records = []
    for i in ids:
        img = root / "JPEGImages" / f"{i}.jpg"
        records.append(Record(i, img, (root / "SegmentationClass" / f"{i}.png",
                                       root / "Annotations" / f"{i}.xml")))

    def loader(record, shape):
        mask_path, xml_path = record.annotation
        gt = None
        if mask_path.is_file():
            try:
                gt = [read_label_map(mask_path)]
            except ImageReadError as exc:
                raise DatasetError(str(exc)) from None
        boxes = None
        if xml_path.is_file():
            boxes = _clip_boxes(_voc_xml_boxes(xml_path, class_ids), shape, str(xml_path))
        return gt, None, boxes

    return Dataset(spec=spec, records=records, kind="voc", ignore_index=255,
                   class_names=list(VOC_CLASSES), has_ground_truth=True, has_boxes=True,
                   _loader=loader)


class _Coco:
    """COCO instances annotations: boxes, semantic label maps (crowd = void)."""

    def __init__(self, ann_file: Path):
        import contextlib
        import io as _io

        from pycocotools.coco import COCO

        data = _read_coco_json(ann_file)
        with contextlib.redirect_stdout(_io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        cats = sorted(self.coco.getCatIds())
        # label ids: 0 = background, 1..K = categories in id order
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        self.class_names = ["background"] + [self.coco.cats[c]["name"] for c in cats]
        self.ann_file = ann_file

    def annotations(self, image_id):
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None))

    def load(self, image_id, shape, ignore_index):
        h, w = shape
        info = self.coco.imgs[image_id]
        if (info["height"], info["width"]) != (h, w):
            raise DatasetError(f"{self.ann_file}: image {image_id} is {info['width']}x"
                               f"{info['height']} in the json but {w}x{h} on disk")
        labels = np.zeros((h, w), np.int32)
        crowd = np.zeros((h, w), bool)
        anns = self.annotations(image_id)
        # paint larger objects first so that small objects on top of them stay visible
        for ann in sorted(anns, key=lambda a: -a.get("area", 0)):
            if not ann.get("segmentation"):
                raise DatasetError(f"{self.ann_file}: annotation {ann['id']} has no "
                                   "segmentation, which a COCO mask dataset needs")
            mask = self.coco.annToMask(ann).astype(bool)
            if ann.get("iscrowd", 0):
                crowd |= mask
            else:
                labels[mask] = self.cat_to_label[ann["category_id"]]
        labels[crowd & (labels == 0)] = ignore_index
        return [labels], None, self.boxes(image_id, shape)

    def boxes(self, image_id, shape) -> list[Box]:
        boxes = []
        for ann in self.annotations(image_id):
            x, y, bw, bh = ann["bbox"]
            boxes.append(Box(x, y, x + bw, y + bh, self.cat_to_label[ann["category_id"]],
                             ignore=bool(ann.get("iscrowd", 0))))
        return _clip_boxes(boxes, shape, f"{self.ann_file} [image {image_id}]")


def _read_coco_json(path: Path) -> dict:
    """Read a COCO instances file and check what the lab uses of it, naming the defect.

    pycocotools assumes a well-formed file and fails on a bad one with a bare ``KeyError``;
    each check here says which file, which annotation or image id, and what is wrong.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    data = read_json(path, error=DatasetError)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO instances json is an object with images, "
                           f"annotations and categories; got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing list {key!r}" if key not in data
                               else f"{path}: {key!r} must be a list")

    def need(entry, where, keys):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {where} must be an object")
        for key in keys:
            if key not in entry:
                raise DatasetError(f"{path}: {where} has no {key!r}")

    categories = set()
    for i, cat in enumerate(data["categories"]):
        need(cat, f"category #{i}", ("id", "name"))
        categories.add(cat["id"])
    images = set()
    for i, img in enumerate(data["images"]):
        need(img, f"image #{i}", ("id", "file_name", "height", "width"))
        if not isinstance(img["file_name"], str):
            raise DatasetError(f"{path}: image {img['id']}: file_name must be a string")
        images.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        need(ann, f"annotation #{i}", ("id",))
        where = f"annotation {ann['id']}"
        need(ann, where, ("image_id", "category_id", "bbox"))
        if ann["category_id"] not in categories:
            raise DatasetError(f"{path}: {where}: unknown category_id {ann['category_id']!r} "
                               "(not in 'categories')")
        if ann["image_id"] not in images:
            raise DatasetError(f"{path}: {where}: unknown image_id {ann['image_id']!r}")
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and np.isfinite(v) for v in bbox)):
            raise DatasetError(f"{path}: {where}: bbox must be 4 finite numbers [x, y, width, "
                               f"height], got {json.dumps(bbox)[:80]}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{path}: {where}: bbox has a negative width or height {bbox}")
    return data


def _coco(ann_file: Path, images: Path, spec: str, ignore_index) -> Dataset:
    coco = _Coco(ann_file)
    if not images.is_dir():
        raise DatasetError(f"{images}: COCO images directory not found")
    records = []
    for image_id in sorted(coco.coco.imgs):
        info = coco.coco.imgs[image_id]
        path = images / info["file_name"]
        if path.is_file():
            records.append(Record(Path(info["file_name"]).stem, path, image_id))
    if not records:
        raise DatasetError(f"{spec}: none of the json's images is in {images}")
    void = 255 if ignore_index is None else ignore_index

    def loader(record, shape):
        return coco.load(record.annotation, shape, void)

    return Dataset(spec=spec, records=records, kind="coco", ignore_index=void,
                   class_names=coco.class_names, has_ground_truth=True, has_boxes=True,
                   _loader=loader)


def _box_source(boxes: str | os.PathLike, class_names):
    path = Path(boxes)
    if path.suffix.lower() == ".csv":
        return _CsvBoxes(path, class_names)
    if path.suffix.lower() == ".json":
        coco = _Coco(path)
        by_stem = {Path(i["file_name"]).stem: iid for iid, i in coco.coco.imgs.items()}

        def from_coco(record, shape):
            iid = by_stem.get(record.image_path.stem)
            return [] if iid is None else coco.boxes(iid, shape)

        return from_coco
    if path.is_dir():
        class_ids = {n: i for i, n in enumerate(class_names or VOC_CLASSES)}

        def from_xml(record, shape):
            xml = path / f"{record.image_path.stem}.xml"
            if not xml.is_file():
                return []
            return _clip_boxes(_voc_xml_boxes(xml, class_ids), shape, str(xml))

        return from_xml
    raise DatasetError(f"{path}: boxes must be a .csv file, a COCO .json or a folder of VOC .xml")


def open_dataset(spec: str | os.PathLike, *, split: str | None = None,
                 ignore_index: int | None = None, boxes: str | os.PathLike | None = None,
                 boxes_from_masks: bool = False) -> Dataset:
    """Open a dataset from a spec string (see the module docstring for the spellings).

    Parameters
    ----------
    spec : str or path-like
    split : str, optional
        ``train`` / ``val`` / ``test`` for ``bsds500`` (default ``val``) and ``voc``
        (default ``val``).
    ignore_index : int, optional
        Void label of ``masks`` datasets (COCO crowd regions use it too; default 255 there).
    boxes : path-like, optional
        Extra box annotations: a CSV, a COCO json or a folder of VOC XML files.
    boxes_from_masks : bool
        Replace boxes by tight boxes around each connected component of each class of the
        ground truth (class 0 is background).
    """
    spec_str = os.fspath(spec)
    kind, _, rest = spec_str.partition(":")
    if kind in ("folder", "masks", "bsds500", "voc", "coco") and rest:
        parts = rest.split(":")
    else:
        kind, parts = "folder", [spec_str]
    try:
        if kind == "folder":
            ds = _folder(Path(parts[0] if len(parts) == 1 else rest), spec_str)
        elif kind == "masks":
            if len(parts) != 2:
                raise DatasetError(f"{spec_str!r}: expected masks:IMAGES_DIR:MASKS_DIR")
            ds = _masks(Path(parts[0]), Path(parts[1]), spec_str, ignore_index)
        elif kind == "bsds500":
            ds = _bsds(Path(rest), split or "val", spec_str)
        elif kind == "voc":
            ds = _voc(Path(rest), split or "val", spec_str)
        else:
            if len(parts) != 2:
                raise DatasetError(f"{spec_str!r}: expected coco:ANNOTATIONS_JSON:IMAGES_DIR")
            ds = _coco(Path(parts[0]), Path(parts[1]), spec_str, ignore_index)
    except DatasetError:
        raise
    if boxes is not None:
        source = _box_source(boxes, ds.class_names)
        if isinstance(source, _CsvBoxes):
            if source.class_names is not None:
                ds.class_names = source.class_names
            unmatched = source.unmatched(ds.records)
            if unmatched:
                warnings.warn(f"{boxes}: {len(unmatched)} image id(s) are not in {spec_str}, "
                              f"their boxes are ignored: {', '.join(unmatched[:5])}"
                              f"{', ...' if len(unmatched) > 5 else ''}", stacklevel=2)
        ds._box_source = source
        ds.has_boxes = True
    if boxes_from_masks:
        if not ds.has_ground_truth:
            raise DatasetError(f"{spec_str}: --boxes-from-masks needs a dataset with masks")
        ds.boxes_from_masks = True
        ds.has_boxes = True
    return ds
