"""Writing an evaluation report: ``metrics.json``, ``per_image.csv``, ``report.md``, ``report.html``.

Every file is written atomically (:func:`unsup.io.atomic_write_bytes`), so an interrupted run
never leaves a half-written report. Overlays of the best and worst images are small PNGs in
``overlays/`` next to the HTML page: image | prediction | ground truth (first annotator).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from unsup.io import atomic_write_bytes, overlay

__all__ = ["write_report", "format_value", "overlay_strip", "HEADLINE"]

#: Headline metrics printed per protocol.
HEADLINE = {
    "bsds": ("boundary.ods_f", "boundary.ois_f", "boundary.ap", "covering.ods", "covering.ois",
             "covering.best", "pri.ods", "pri.ois", "voi.ods", "voi.ois"),
    "matched": ("miou.all", "miou.fine", "miou.coarse", "ap50", "ap70"),
    "hungarian": ("miou", "pixel_accuracy", "mean_accuracy", "n_clusters", "n_classes"),
    "semantic": ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "n_classes"),
}

#: Height (pixels) of the overlay strips in the HTML report.
OVERLAY_HEIGHT = 160


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_value(value) -> str:
    """Short human-readable form of a metric value."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def overlay_strip(image: np.ndarray, labels: np.ndarray, gt: np.ndarray | None,
                  *, height: int = OVERLAY_HEIGHT) -> np.ndarray:
    """``image | overlay(prediction) | overlay(ground truth)``, resized to ``height`` rows."""
    panels = [np.asarray(image, np.uint8), overlay(image, labels)]
    if gt is not None:
        panels.append(overlay(image, gt))
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(gap)
        parts.append(p)
    strip = np.concatenate(parts, axis=1)
    scale = height / strip.shape[0]
    size = (max(1, round(strip.shape[1] * scale)), height)
    return np.asarray(Image.fromarray(strip).resize(size, Image.BILINEAR))


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_id)


def _csv_bytes(rows: list[dict]) -> bytes:
    columns = ["id"]
    for row in rows:
        for k, v in row.items():
            if k not in columns and not isinstance(v, list | dict):
                columns.append(k)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c)
            if isinstance(v, float):
                out.append("" if not math.isfinite(v) else repr(v))
            else:
                out.append("" if v is None else v)
        writer.writerow(out)
    return buf.getvalue().encode()


def _summary_items(metrics: dict) -> list[tuple[str, object]]:
    return [(k, v) for k, v in metrics.items()
            if not isinstance(v, dict | list) and k not in ("protocol",)]


def write_report(out, *, protocol: str, metrics: dict, rows: list[dict], meta: dict,
                 score_key: str, overlays: list[tuple[str, str, np.ndarray]] = (),
                 extra_json: dict | None = None) -> dict[str, Path]:
    """Write the four report files (and the overlay PNGs) into ``out``.

    Parameters
    ----------
    out : path-like
        Report folder (created).
    protocol : str
    metrics : dict
        Flat metric keys; nested values (``per_class_iou``) are kept in the JSON.
    rows : list of dict
        Per-image rows (``id`` first).
    meta : dict
        Settings shown in the report (prediction folder, dataset, thresholds, timing ...).
    score_key : str
        Per-image column used to rank images.
    overlays : list of (kind, sample id, strip image)
        ``kind`` is ``"best"`` or ``"worst"``.
    extra_json : dict, optional
        Extra top-level entries for ``metrics.json`` (curves ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    payload = {"protocol": protocol, **metrics}
    payload["meta"] = meta
    if extra_json:
        payload.update(extra_json)
    paths["metrics"] = out / "metrics.json"
    atomic_write_bytes(paths["metrics"],
                       (json.dumps(_jsonable(payload), indent=2) + "\n").encode())
    paths["per_image"] = out / "per_image.csv"
    atomic_write_bytes(paths["per_image"], _csv_bytes(rows))

    images = []
    for i, (kind, sample_id, strip) in enumerate(overlays):
        rel = Path("overlays") / f"{kind}_{i:02d}_{_safe_name(sample_id)}.png"
        atomic_write_bytes(out / rel, _png_bytes(strip))
        row = next((r for r in rows if r["id"] == sample_id), {})
        images.append((kind, sample_id, rel.as_posix(), row.get(score_key)))

    summary = _summary_items(metrics)
    per_class = metrics.get("per_class_iou")
    ranked = sorted((r for r in rows if isinstance(r.get(score_key), float)
                     and math.isfinite(r[score_key])), key=lambda r: r[score_key])

    md = [f"# Evaluation report: `{protocol}`", ""]
    md += ["| setting | value |", "| --- | --- |"]
    md += [f"| {k} | {format_value(v)} |" for k, v in meta.items()]
    md += ["", "## Scores", "", "| metric | value |", "| --- | --- |"]
    md += [f"| `{k}` | {format_value(v)} |" for k, v in summary]
    if per_class:
        md += ["", "## Per-class IoU", "", "| class | IoU |", "| --- | --- |"]
        md += [f"| {k} | {format_value(v)} |" for k, v in per_class.items()]
    if ranked:
        def listing(chosen):
            return ", ".join(f"{r['id']} ({format_value(r[score_key])})" for r in chosen)

        md += ["", f"## Images ranked by `{score_key}`", "",
               f"Worst: {listing(ranked[:5])}", "", f"Best: {listing(ranked[::-1][:5])}"]
    if images:
        md += ["", "## Overlays (image | prediction | ground truth)", ""]
        md += [f"- {kind} `{sid}` ({format_value(score)}): ![{sid}]({rel})"
               for kind, sid, rel, score in images]
    md += ["", f"Per-image values: `per_image.csv` ({len(rows)} rows); all values: `metrics.json`.",
           ""]
    paths["report_md"] = out / "report.md"
    atomic_write_bytes(paths["report_md"], "\n".join(md).encode())

    esc = html.escape
    h = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
         f"<title>unsup evaluation: {esc(protocol)}</title>",
         "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:left}td.num{text-align:right;font-family:monospace}"
         "figure{margin:1em 0}figcaption{font-size:90%;color:#444}</style></head><body>",
         f"<h1>Evaluation report: <code>{esc(protocol)}</code></h1>",
         "<table><tr><th>setting</th><th>value</th></tr>"]
    h += [f"<tr><td>{esc(str(k))}</td><td>{esc(format_value(v))}</td></tr>"
          for k, v in meta.items()]
    h += ["</table><h2>Scores</h2><table><tr><th>metric</th><th>value</th></tr>"]
    h += [f"<tr><td><code>{esc(k)}</code></td><td class='num'>{esc(format_value(v))}</td></tr>"
          for k, v in summary]
    h += ["</table>"]
    if per_class:
        h += ["<h2>Per-class IoU</h2><table><tr><th>class</th><th>IoU</th></tr>"]
        h += [f"<tr><td>{esc(str(k))}</td><td class='num'>{esc(format_value(v))}</td></tr>"
              for k, v in per_class.items()]
        h += ["</table>"]
    for kind in ("best", "worst"):
        chosen = [x for x in images if x[0] == kind]
        if chosen:
            h += [f"<h2>{kind.capitalize()} images by <code>{esc(score_key)}</code> "
                  "(image | prediction | ground truth)</h2>"]
            h += [f"<figure><img src='{esc(rel)}' alt='{esc(sid)}'><figcaption>{esc(sid)}: "
                  f"{esc(format_value(score))}</figcaption></figure>"
                  for _, sid, rel, score in chosen]
    h += [f"<p>Per-image values: <a href='per_image.csv'>per_image.csv</a> ({len(rows)} rows); "
          "all values: <a href='metrics.json'>metrics.json</a>.</p></body></html>", ""]
    paths["report_html"] = out / "report.html"
    atomic_write_bytes(paths["report_html"], "\n".join(h).encode())
    return paths
