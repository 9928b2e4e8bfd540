"""``unsup compare``: train several methods alike and compare them on a test set.

Every method is trained on the same training images with the same network parameters,
epochs, time budget and seed (``--param KEY=VALUE`` applies to every method having ``KEY``;
``METHOD.KEY=VALUE`` to one), then segments the test set and is scored by the evaluation
harness (``semantic`` protocol: mIoU, per-class IoU, pixel accuracy), optionally also after
the dense CRF. Methods that learn from boxes get the training set's boxes (``--boxes``, or
the dataset's own), or boxes derived from its masks when it has none; they never see masks
(:meth:`unsup.datasets.Dataset.boxes_only`). The report says which.

Outputs in ``REPORT_DIR``::

    compare.json            {method: {miou, per_class_iou, train_seconds, pixel_accuracy,
                             supervision, ratio_to_masks, crf: {...} or None, ...}}
    compare.md              the table and the setting (data sizes, box source, budget, seed)
    report.html             table, per-class IoU plot, training curves, side-by-side overlays
    models/<method>/        trained models (rerunning compare reuses finished ones and
                            resumes interrupted ones)
    predictions/<method>[+crf]/labels/<id>.png, eval/<method>[+crf]/  (harness reports)
"""

from __future__ import annotations

import html
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

__all__ = ["compare", "CompareError", "split_params"]


class CompareError(ValueError):
    """The comparison cannot run as asked (the message says why)."""


def split_params(params: dict, methods: list[str]) -> dict[str, dict]:
    """Dispatch ``--param`` values: ``KEY`` to every method having it, ``METHOD.KEY`` to one.

    Raises
    ------
    CompareError
        A key no compared method has, or a ``METHOD.`` prefix naming no compared method.
    """
    from unsup.registry import get_method, method_parameters

    known = {m: method_parameters(get_method(m)) for m in methods}
    out: dict[str, dict] = {m: {} for m in methods}
    for key, value in params.items():
        owner, dot, name = key.partition(".")
        if dot:
            if owner not in out:
                raise CompareError(f"--param {key}: {owner!r} is not one of the compared "
                                   f"methods ({', '.join(methods)})")
            if name.split("__", 1)[0] not in known[owner]:
                raise CompareError(f"--param {key}: method {owner!r} has no parameter {name!r}")
            out[owner][name] = value
            continue
        # a nested option (network__lr) goes to every method with that group
        takers = [m for m in methods if key.split("__", 1)[0] in known[m]]
        if not takers:
            raise CompareError(f"--param {key}: no compared method has this parameter")
        for m in takers:
            out[m][key] = value
    return out


def _model_complete(model_dir: Path) -> bool:
    info = model_dir / "train.json"
    if not (model_dir / "model.json").is_file() or not info.is_file():
        return False
    try:
        record = json.loads(info.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("history", {}).get("stopped") != "time_budget" and record.get("complete")


def compare(train_spec: str, test_spec: str, methods: list[str], out, *, epochs=None,
            max_minutes=None, params: dict | None = None, seed: int = 0, crf: bool = False,
            split=None, test_split=None, ignore_index=None, classes=None, boxes=None,
            val=None, val_fraction=None, n_overlays: int = 6, progress: bool = True) -> dict:
    """Train ``methods`` alike on ``train_spec``, evaluate them on ``test_spec``, report.

    Returns
    -------
    dict
        ``{"results": compare.json content, "table_markdown": str, "setting": dict}``.
    """
    from unsup.base import RunOptions, params_to_json
    from unsup.datasets import open_dataset
    from unsup.evaluation import evaluate
    from unsup.io import atomic_write_bytes
    from unsup.registry import get_method, load_method
    from unsup.runner import segment_dataset
    from unsup.workflows import create_seeded, fit_method, open_training_data, samples_for

    out = Path(out)
    if len(set(methods)) != len(methods):
        raise CompareError(f"--methods lists a method twice: {methods}")
    classes_of = {}
    for name in methods:
        cls = get_method(name)
        if cls.supervision == "none":
            raise CompareError(f"method {name!r} does not learn; compare trains methods "
                               "(boxsup, supervised, ...)")
        classes_of[name] = cls
    per_method = split_params(params or {}, methods)

    probe = open_dataset(train_spec, split=split, ignore_index=ignore_index)
    box_methods = [m for m in methods if classes_of[m].supervision == "boxes"]
    if boxes is not None:
        box_source = f"box file {boxes}"
    elif probe.has_boxes:
        box_source = f"the training dataset's own boxes ({probe.kind})"
    elif probe.has_ground_truth:
        box_source = ("derived from the training masks (tight box per connected component of "
                      "each class); the masks themselves are withheld")
    else:
        box_source = None
    if box_methods and box_source is None:
        raise CompareError(f"{train_spec}: has neither boxes nor masks for "
                           f"{', '.join(box_methods)}; give --boxes PATH")
    derive = boxes is None and not probe.has_boxes

    def training_data(kind):
        return open_training_data(train_spec, split=split, ignore_index=ignore_index,
                                  boxes=boxes if kind == "boxes" else None,
                                  boxes_from_masks=derive and kind == "boxes",
                                  classes=classes, val_fraction=val_fraction, seed=seed)

    test = open_dataset(test_spec, split=test_split, ignore_index=ignore_index)
    if classes:
        test = test.restrict_classes(classes)
    if not test.has_ground_truth:
        raise CompareError(f"{test_spec}: the test set has no ground truth")
    val_set = None
    if val is not None:
        val_set = open_dataset(val, split=split, ignore_index=ignore_index)
        if classes:
            val_set = val_set.restrict_classes(classes)

    results: dict[str, dict] = {}
    crf_model = None
    if crf:
        from unsup.crf import DenseCRF

        crf_model = DenseCRF()
    n_train = None
    for name in methods:
        cls = classes_of[name]
        dataset, held_out = training_data(cls.supervision)
        n_train = len(dataset)
        validation = val_set if val_set is not None else held_out
        model_dir = out / "models" / name
        if _model_complete(model_dir):
            method = load_method(model_dir)
            record = json.loads((model_dir / "train.json").read_text())
            seconds = float(record["fit_seconds"])
        else:
            method = create_seeded(name, per_method[name], seed=seed)
            resume = (model_dir / "checkpoint.pt").is_file()
            samples = samples_for(cls, dataset)
            print(f"compare: training {name} on {len(samples)} image(s)"
                  + (" (resuming)" if resume else ""), flush=True)
            seconds = fit_method(method, samples, val_samples=validation,
                                 run=RunOptions(out_dir=model_dir, epochs=epochs,
                                                max_minutes=max_minutes, resume=resume),
                                 progress=progress)
            history = method.training_history()
            record = {"method": name, "params": params_to_json(method),
                      "fit_seconds": round(seconds, 2), "history": history,
                      "complete": history.get("stopped") != "time_budget"}
            atomic_write_bytes(model_dir / "train.json",
                               json.dumps(record, indent=2, default=str).encode())
        history = method.training_history()
        entry = {"supervision": cls.supervision, "train_seconds": round(seconds, 2),
                 "train_loop_seconds": history.get("train_seconds"),
                 "epochs_run": history.get("epochs_run"), "stopped": history.get("stopped"),
                 "params": params_to_json(method)}
        if cls.supervision == "boxes":
            entry["box_source"] = box_source
        variants = [("", None)] + ([("+crf", crf_model)] if crf_model is not None else [])
        for suffix, post in variants:
            pred_dir = out / "predictions" / f"{name}{suffix}"
            segment_dataset(test, method, pred_dir, crf=post, seed=seed, progress=progress)
            metrics = evaluate("semantic", pred_dir / "labels", test,
                               out / "eval" / f"{name}{suffix}", progress=progress, n_jobs=1)
            scores = {"miou": float(metrics["miou"]),
                      "per_class_iou": metrics["per_class_iou"],
                      "pixel_accuracy": float(metrics["pixel_accuracy"]),
                      "mean_accuracy": float(metrics.get("mean_accuracy", float("nan")))}
            if suffix:
                entry["crf"] = scores
            else:
                entry.update(scores)
        entry.setdefault("crf", None)
        results[name] = entry

    reference = next((m for m in methods if classes_of[m].supervision == "masks"), None)
    for name, entry in results.items():
        entry["ratio_to_masks"] = None
        if reference is not None and name != reference and results[reference]["miou"] > 0:
            entry["ratio_to_masks"] = entry["miou"] / results[reference]["miou"]
            fg = _foreground_iou(entry), _foreground_iou(results[reference])
            if None not in fg and fg[1] > 0:
                entry["fg_ratio_to_masks"] = fg[0] / fg[1]
            if entry["crf"] and results[reference]["crf"]:
                entry["crf"]["ratio_to_masks"] = (entry["crf"]["miou"]
                                                  / results[reference]["crf"]["miou"])
    setting = {"train": train_spec, "test": test_spec, "n_train": n_train,
               "n_test": len(test), "n_val": None if val_set is None and not val_fraction
               else (len(val_set) if val_set is not None else "held out"),
               "classes": classes, "test_class_names": test.class_names,
               "box_source": box_source if box_methods else None, "epochs": epochs,
               "max_minutes": max_minutes, "seed": seed, "params": params or {},
               "reference": reference, "crf": crf, "machine": _machine(),
               "date": time.strftime("%Y-%m-%d")}
    atomic_write_bytes(out / "compare.json", json.dumps(results, indent=2, default=str).encode())
    atomic_write_bytes(out / "setting.json", json.dumps(setting, indent=2, default=str).encode())
    table = _markdown_table(results, reference, crf)
    atomic_write_bytes(out / "compare.md", _markdown_report(table, setting).encode())
    _html_report(out, results, setting, table, test, methods, crf, n_overlays)
    return {"results": results, "table_markdown": table, "setting": setting}


def _foreground_iou(entry: dict):
    """IoU of the single non-background class of a two-class problem, else None."""
    per = entry.get("per_class_iou") or {}
    if len(per) != 2:
        return None
    keys = list(per)
    value = per[keys[1]]
    return None if value is None else float(value)


def _machine() -> dict:
    import os

    info = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        pass
    return info


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _markdown_table(results: dict, reference, crf: bool) -> str:
    binary = all(_foreground_iou(e) is not None for e in results.values())
    head = ["method", "learns from", "mIoU"]
    if binary:
        head.append("foreground IoU")
    head += ["pixel acc.", f"ratio to {reference or 'masks'}"]
    if crf:
        head += ["mIoU + CRF", "ratio + CRF"]
    head += ["train min", "epochs", "stopped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results.items():
        row = [name, e["supervision"], _fmt(e["miou"])]
        if binary:
            row.append(_fmt(_foreground_iou(e)))
        ratio = e.get("ratio_to_masks")
        if binary and e.get("fg_ratio_to_masks") is not None:
            ratio_text = f"{ratio:.3f} (fg {e['fg_ratio_to_masks']:.3f})"
        else:
            ratio_text = _fmt(ratio, 3)
        row += [_fmt(e["pixel_accuracy"]), ratio_text]
        if crf:
            c = e.get("crf") or {}
            row += [_fmt(c.get("miou")), _fmt(c.get("ratio_to_masks"), 3)]
        row += [f"{e['train_seconds'] / 60:.1f}", _fmt(e.get("epochs_run")),
                _fmt(e.get("stopped"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _markdown_report(table: str, setting: dict) -> str:
    lines = ["# Comparison", "", table, "",
             f"- train: `{setting['train']}` ({setting['n_train']} images), test: "
             f"`{setting['test']}` ({setting['n_test']} images)"]
    if setting.get("classes"):
        lines.append(f"- classes kept: {', '.join(map(str, setting['classes']))} "
                     "(others = background)")
    if setting.get("box_source"):
        lines.append(f"- boxes: {setting['box_source']}")
    lines.append(f"- budget: epochs={setting['epochs'] or 'method default'}, "
                 f"max_minutes={setting['max_minutes']}, seed={setting['seed']}, "
                 f"params={setting['params']}")
    lines.append(f"- machine: {setting['machine']}, date {setting['date']}")
    lines.append("- train min = wall time of fit (data caching and box proposals included)")
    return "\n".join(lines) + "\n"


def _per_class_plot(results: dict, path: Path, crf: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unsup.io import atomic_write_path

    names = list(results)
    classes = list(next(iter(results.values()))["per_class_iou"])
    fig = Figure(figsize=(max(5.0, 0.9 * len(classes) * max(len(names), 1)), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(classes))
    for k, name in enumerate(names):
        values = [np.nan if v is None else float(v)
                  for v in results[name]["per_class_iou"].values()]
        ax.bar(x + k * width, values, width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2)
    ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(bottom=0.3)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def _overlay_strip(out: Path, test, sample_index: int, columns: list[str]) -> str | None:
    from unsup.io import overlay, read_label_map, write_image

    sample = test.load(sample_index)
    tiles, titles = [sample.image], ["image"]
    gt = sample.label_map
    if gt is not None:
        tiles.append(overlay(sample.image, np.where(gt == test.ignore_index, 0, gt)
                             if test.ignore_index is not None else gt))
        titles.append("ground truth")
    for column in columns:
        path = out / "predictions" / column / "labels" / f"{sample.id}.png"
        if not path.is_file():
            continue
        tiles.append(overlay(sample.image, read_label_map(path)))
        titles.append(column)
    h = max(t.shape[0] for t in tiles)
    scale = min(1.0, 200.0 / h)
    from unsup.augment import resize_image

    resized = [resize_image(t, (max(1, round(t.shape[0] * scale)),
                                max(1, round(t.shape[1] * scale)))) for t in tiles]
    strip = np.concatenate([np.pad(t, ((0, resized[0].shape[0] - t.shape[0]), (0, 4), (0, 0)),
                                   constant_values=255) for t in resized], axis=1)
    name = f"overlays/{sample.id.replace('/', '__')}.png"
    write_image(out / name, strip)
    return name, titles


def _html_report(out: Path, results, setting, table_md, test, methods, crf, n_overlays):
    from unsup.io import atomic_write_bytes

    _per_class_plot(results, out / "per_class_iou.png", crf)
    columns = [m + s for m in methods for s in (("", "+crf") if crf else ("",))]
    n = len(test)
    picks = sorted(set(np.linspace(0, n - 1, num=min(n_overlays, n)).round().astype(int)))
    strips = []
    for i in picks:
        made = _overlay_strip(out, test, int(i), columns)
        if made:
            strips.append(made)
    curves = []
    for m in methods:
        src = out / "models" / m / "curves.png"
        if src.is_file():
            dst = out / "curves" / f"{m}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            curves.append((m, f"curves/{m}.png"))
    rows = []
    for line in table_md.splitlines():
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if not rows else "td"
        rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells)
                    + "</tr>")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>unsup compare</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "img{max-width:100%}</style></head><body>",
             "<h1>Comparison</h1>", "<table>", *rows, "</table>", "<ul>"]
    for key in ("train", "test", "n_train", "n_test", "classes", "box_source", "epochs",
                "max_minutes", "seed", "params", "machine", "date"):
        parts.append(f"<li><b>{key}</b>: {html.escape(str(setting.get(key)))}</li>")
    parts += ["</ul>", "<h2>Per-class IoU</h2>", "<img src='per_class_iou.png'>",
              "<h2>Training curves</h2>"]
    for m, src in curves:
        parts.append(f"<h3>{html.escape(m)}</h3><img src='{html.escape(src)}'>")
    parts.append("<h2>Test images</h2>")
    for src, titles in strips:
        parts.append(f"<p>{' | '.join(html.escape(t) for t in titles)}</p>"
                     f"<img src='{html.escape(src)}'>")
    parts.append("</body></html>")
    atomic_write_bytes(out / "report.html", "\n".join(parts).encode())
