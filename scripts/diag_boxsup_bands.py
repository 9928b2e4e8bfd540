"""Where does a box-supervised network lose foreground IoU to a mask-supervised one?

Bins every error pixel (false positive / false negative, foreground = label > 0) of two sets
of test predictions by its distance to the true boundary, and counts false-positive
components detached by more than 10 px from the object (docs/benchmarks/boxsup.md, session 9)::

    python scripts/diag_boxsup_bands.py TEST_MASKS BOXSUP_LABELS SUPERVISED_LABELS

where the label folders are `predictions/<method>/labels` of `unsup compare` (or
`scripts/bench_boxsup.py`) and TEST_MASKS the test masks, matched by file name.
"""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from unsup.io import read_label_map

masks, pb, ps = map(Path, sys.argv[1:4])
edges = [0, 2, 5, 10, 20, 10**9]
names = [f"{a}-{b}px" if b < 10**9 else f">{a}px" for a, b in zip(edges, edges[1:], strict=False)]
acc = {m: {"fp": np.zeros(len(names)), "fn": np.zeros(len(names)), "tp": 0} for m in ("boxsup", "supervised")}
blobs = {"boxsup": [0, 0], "supervised": [0, 0]}  # (false-positive components far from the horse, their pixels)
n = 0
for gt_path in sorted(masks.glob("*.png")):
    gt = read_label_map(gt_path) > 0
    inside = ndimage.distance_transform_edt(gt)
    outside = ndimage.distance_transform_edt(~gt)
    dist = np.where(gt, inside, outside)  # distance to the boundary, both sides
    band = np.digitize(dist, edges[1:-1], right=True)
    for m, d in (("boxsup", pb), ("supervised", ps)):
        pred = read_label_map(d / gt_path.name) > 0
        fp, fn = pred & ~gt, ~pred & gt
        acc[m]["tp"] += int((pred & gt).sum())
        acc[m]["fp"] += np.bincount(band[fp], minlength=len(names))
        acc[m]["fn"] += np.bincount(band[fn], minlength=len(names))
        comp, k = ndimage.label(fp)
        for c in range(1, k + 1):
            region = comp == c
            if dist[region].min() > 10:
                blobs[m][0] += 1
                blobs[m][1] += int(region.sum())
    n += 1
print(f"{n} test images; pooled foreground IoU and error pixels (x1000) by distance to the true boundary")
for m, a in acc.items():
    iou = a["tp"] / (a["tp"] + a["fp"].sum() + a["fn"].sum())
    print(f"{m}: IoU {iou:.4f}  FP {a['fp'].sum() / 1e3:.1f}k  FN {a['fn'].sum() / 1e3:.1f}k; "
          f"detached FP blobs (>10 px from the horse): {blobs[m][0]} ({blobs[m][1] / 1e3:.1f}k px)")
    print("   FP " + "  ".join(f"{nm} {v / 1e3:.1f}k" for nm, v in zip(names, a["fp"], strict=True)))
    print("   FN " + "  ".join(f"{nm} {v / 1e3:.1f}k" for nm, v in zip(names, a["fn"], strict=True)))
b, s = acc["boxsup"], acc["supervised"]
extra = (b["fp"] + b["fn"]) - (s["fp"] + s["fn"])
print("extra errors of boxsup per band: " + "  ".join(f"{nm} {v / 1e3:+.1f}k" for nm, v in zip(names, extra, strict=True)))
print(f"share of the extra errors within 5 px of the boundary: {extra[:2].sum() / extra.sum():.2f}")
