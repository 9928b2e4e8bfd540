"""Datasets: one loader API for unlabeled folders, label maps, BSDS500, PASCAL VOC and COCO.

A dataset is an ordered list of lightweight records (id, file paths); images and annotations
are read only when a sample is loaded, so iterating never holds more than one image in
memory. ``load`` is a pure function of the record, so samples can be loaded by workers.

Dataset specs (as accepted by :func:`open_dataset` and the CLI)::

    DIR | FILE | folder:DIR            unlabeled images, recursive, sorted; id = relative path
                                       without extension
    masks:IMAGES_DIR:MASKS_DIR         label maps matched by file stem (``ignore_index`` = void)
    bsds500:ROOT                       ROOT/images/SPLIT/*.jpg + ROOT/groundTruth/SPLIT/*.mat,
                                       all annotators
    voc:ROOT                           PASCAL VOC 2012 (SegmentationClass, Annotations, ImageSets)
    coco:ANNOTATIONS_JSON:IMAGES_DIR   COCO instances json (boxes, polygon/RLE masks, crowd = void)

Boxes can also come from a VOC XML folder, a COCO json or a CSV (``image,x0,y0,x1,y1,label``)
via ``boxes=``, or be derived from the masks with ``boxes_from_masks=True``.
"""

from unsup.datasets.core import (
    VOC_CLASSES,
    Box,
    BoxesOnlyDataset,
    Dataset,
    DatasetError,
    Record,
    Sample,
    boxes_from_masks,
)
from unsup.datasets.sources import (
    BOX_CLASS_RANGE,
    MAX_LABEL,
    RUN_MARKER,
    RUN_OUTPUT_FOLDERS,
    load_bsds_ground_truth,
    open_dataset,
)

__all__ = ["Box", "Sample", "Record", "Dataset", "BoxesOnlyDataset", "DatasetError",
           "open_dataset", "boxes_from_masks", "load_bsds_ground_truth", "VOC_CLASSES",
           "MAX_LABEL", "RUN_MARKER", "RUN_OUTPUT_FOLDERS", "BOX_CLASS_RANGE"]
