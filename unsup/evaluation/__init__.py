"""The lab's evaluation harness: one measuring instrument for every method.

``evaluate(protocol, pred, dataset, out)`` scores a folder of predictions against a dataset's
ground truth and writes ``metrics.json``, ``per_image.csv``, ``report.md`` and ``report.html``.
Protocols:

``bsds``
    The Berkeley benchmark (boundary P/R/F at ODS/OIS + AP, segmentation covering, PRI, VOI)
    for segmentations, BSDS ``ucm2`` hierarchies, lab ``unsup-ucm`` hierarchies and soft
    boundary maps (:mod:`unsup.evaluation.bsds`).
``matched``
    Per-image unsupervised mIoU with one-to-one segment matching, AP50/AP70
    (:mod:`unsup.evaluation.matched`).
``hungarian``
    Dataset-level cluster-to-class Hungarian matching, mIoU and pixel accuracy
    (:mod:`unsup.evaluation.confusion`).
``semantic``
    Supervised class predictions: mIoU, per-class IoU, pixel and mean accuracy, FWIoU.

Conventions are documented in ``docs/evaluation.md``.
"""

from unsup.evaluation.harness import PROTOCOLS, EvaluationError, evaluate
from unsup.evaluation.predictions import PredictionError

__all__ = ["evaluate", "PROTOCOLS", "EvaluationError", "PredictionError"]
