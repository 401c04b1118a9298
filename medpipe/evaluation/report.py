"""Evaluation report: ``metrics.json`` plus a self-contained ``report.html`` (inline CSS, figures as base64 PNG
data URIs, no scripts, no external resources) written for a clinician-facing team, and a markdown summary for a
Prefect artifact.

Every string that comes from data is HTML-escaped. Only counts are shown for lists (e.g. patient pseudonyms),
never their contents; sample panels are numbered, never identified.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, cast

import numpy as np

from medpipe.task import Task

__all__ = ["baseline_table", "case_sections", "headline", "markdown_summary", "network_vs_baselines", "to_jsonable",
           "write_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #2b6cb0;padding-bottom:.2em}h2{margin-top:1.8em;color:#2b6cb0}
.headline{background:#f0f5fb;border-left:5px solid #2b6cb0;padding:.6em 1em;margin:1em 0}
.headline p{margin:.3em 0;font-size:1.08em}.muted{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}.caveats li{margin:.3em 0}
code{background:#f4f4f4;padding:0 .2em}
"""


# ---- JSON ----------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj``: numpy/torch scalars and arrays to Python, NaN/inf to ``None``, paths to str."""
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ---- number formatting ---------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(f) else f"{f:.{digits}f}"


def _with_ci(metrics: Mapping[str, Any], key: str, digits: int = 2) -> str:
    value = _num(metrics.get(key), digits)
    ci = (metrics.get("ci") or {}).get(key)
    if value == "n/a" or not ci or _num(ci.get("low")) == "n/a":
        return value
    level = int(round(100 * float(ci.get("level", 0.95))))
    return f"{value} ({level}% CI {_num(ci['low'], digits)}\u2013{_num(ci['high'], digits)})"


def _cohort(metrics: Mapping[str, Any], data_info: Mapping[str, Any]) -> str:
    unit = str(data_info.get("unit") or ("images" if metrics.get("task") == Task.classify else "cases"))
    text = f"on {int(metrics.get('n', 0))} test {unit}"
    n_patients = data_info.get("n_patients")
    if n_patients is not None:
        text += f" from {int(n_patients)} patient{'s' if int(n_patients) != 1 else ''}"
    return text


def _headline_items(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(label, formatted value with CI, plain-language meaning)."""
    if metrics.get("task") == Task.classify:
        return [
            ("Accuracy", _with_ci(metrics, "accuracy"),
             "share of test images whose predicted class matched the reference label"),
            ("Macro F1", _with_ci(metrics, "f1_macro"),
             "balance of precision and recall, averaged so that every class counts equally"),
            ("AUROC", _with_ci(metrics, "auroc"),
             f"how well the model's scores rank positive cases above negative ones "
             f"(0.5 = chance, 1.0 = perfect; {metrics.get('auroc_average', '')})"),
        ]
    if metrics.get("layout") == "volumes":
        return _volume_headline_items(metrics)
    units = metrics.get("hd95_units", "voxels")
    return [
        ("Mean Dice", _with_ci(metrics, "dice_mean"),
         "overlap between predicted and reference outlines (0 = none, 1 = identical)"),
        ("Mean IoU", _with_ci(metrics, "iou_mean"), "intersection over union, a stricter overlap score"),
        ("Mean HD95", _with_ci(metrics, "hd95_mean", 1),
         f"95th-percentile distance between predicted and reference boundaries, in {units} (lower is better); "
         f"{metrics.get('hd95_excluded', 0)} case(s) with an empty mask excluded"),
    ]


def _volume_headline_items(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Headline of a whole-volume (source grid) evaluation: Dice, HD95 in mm and surface Dice."""
    tolerance = float(metrics.get("tolerance_mm", 2.0))
    return [
        ("Mean Dice", _with_ci(metrics, "dice_mean"),
         "overlap between predicted and reference outlines, on each case's original voxels (0 = none, 1 = identical)"),
        ("Mean HD95", _with_ci(metrics, "hd95_mean", 1),
         f"95th-percentile distance between predicted and reference boundaries, in mm (lower is better); "
         f"{metrics.get('hd95_excluded', 0)} case(s) with an empty mask excluded"),
        ("Mean surface Dice", _with_ci(metrics, "surface_dice_mean"),
         f"share of both boundaries lying within {tolerance:g} mm of the other (0 = none, 1 = all)"),
    ]


def headline(metrics: Mapping[str, Any], data_info: Mapping[str, Any] | None = None) -> list[str]:
    """Plain-language headline sentences, e.g. 'Accuracy 0.94 (95% CI 0.90–0.97) on 212 test images from 8 patients'."""
    cohort = _cohort(metrics, data_info or {})
    return [f"{label} {value} {cohort}" for label, value, _ in _headline_items(metrics)]


# ---- markdown ------------------------------------------------------------------------------------------------------


def markdown_summary(metrics: Mapping[str, Any], task: Task | str | None = None,
                     baselines: Mapping[str, Any] | None = None) -> str:
    """Short markdown table of the key numbers (with 95% CIs when present) for a Prefect artifact, followed by the
    model-vs-baselines table and the sentence on what the network adds when ``baselines`` are given."""
    task = Task(cast(str, task or metrics.get("task")))
    m = dict(metrics)
    m["task"] = task
    lines = [f"# medpipe evaluation ({task})", "", f"Test set: **{int(m.get('n', 0))}** cases", "",
             "| metric | value (95% CI) |", "|---|---|"]
    for label, value, _ in _headline_items(m):
        lines.append(f"| {label} | {value} |")
    if baselines:
        header, rows = baseline_table(m, baselines)
        lines += ["", "## Model vs baselines", "", "| " + " | ".join(_md_cell(h) for h in header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines += ["", _md_cell(network_vs_baselines(m, baselines))]
    if task == Task.classify:
        lines += ["", "| class | support | precision | recall | F1 | AUROC |", "|---|---|---|---|---|---|"]
        for name, pc in (m.get("per_class") or {}).items():
            lines.append(f"| {_md_cell(name)} | {pc.get('support')} | {_num(pc.get('precision'), 3)} | "
                         f"{_num(pc.get('recall'), 3)} | {_num(pc.get('f1'), 3)} | {_num(pc.get('auroc'), 3)} |")
    for note in m.get("notes") or []:
        lines.append(f"\n> {_md_cell(note)}")
    return "\n".join(lines)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---- HTML ----------------------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def html_page(title: str, intro_html: str, body_html: str) -> str:
    """A self-contained report page (inline CSS, no external resources): the title, an intro (HTML) and the body."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>{intro_html}" + body_html + "</body></html>\n")


def _img(path: str | None, alt: str) -> str:
    if not path:
        return '<p class="muted">Figure not available.</p>'
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError:
        return '<p class="muted">Figure not available.</p>'
    if not data.startswith(PNG_SIGNATURE):
        return '<p class="muted">Figure skipped: not a PNG file.</p>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _value_html(v: Any) -> str:
    if isinstance(v, Mapping):
        return f"<pre>{_e(json.dumps(to_jsonable(v), indent=2, sort_keys=True))}</pre>"
    if isinstance(v, (list, tuple, set, np.ndarray)):
        return f"{len(v)} entries"  # never list contents (could be pseudonyms or sample ids)
    if isinstance(v, float):
        return _e(_num(v, 4))
    return _e(v)


def _kv_table(d: Mapping[str, Any]) -> str:
    if not d:
        return '<p class="muted">Nothing recorded.</p>'
    rows = "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_value_html(v)}</td></tr>' for k, v in d.items())
    return f"<table>{rows}</table>"


def _per_class_table(metrics: Mapping[str, Any]) -> str:
    pcs = metrics.get("per_class") or {}
    if metrics.get("task") == Task.classify:
        head = "<tr><th class='l'>class</th><th>test cases</th><th>precision</th><th>recall (sensitivity)</th>" \
               "<th>F1</th><th>AUROC</th></tr>"
        body = "".join(
            f"<tr><td class='l'>{_e(name)}</td><td>{_e(pc.get('support'))}</td><td>{_num(pc.get('precision'), 3)}</td>"
            f"<td>{_num(pc.get('recall'), 3)}</td><td>{_num(pc.get('f1'), 3)}</td><td>{_num(pc.get('auroc'), 3)}</td></tr>"
            for name, pc in pcs.items())
    elif metrics.get("layout") == "volumes":
        keys = _metric_keys(metrics)
        head = "<tr><th class='l'>label</th>" + "".join(f"<th>{_e(label)}</th>" for _, label, _ in keys) + \
            "<th>HD95 excluded</th></tr>"
        body = "".join(f"<tr><td class='l'>{_e(name)}</td>" + "".join(f"<td>{_num(pc.get(key), 3)}</td>" for key, _, _
                                                                    in keys) + f"<td>{_e(pc.get('hd95_excluded'))}</td></tr>"
                       for name, pc in pcs.items())
    else:
        head = "<tr><th class='l'>label</th><th>mean Dice</th><th>mean IoU</th><th>mean HD95</th>" \
               "<th>HD95 excluded</th></tr>"
        body = "".join(
            f"<tr><td class='l'>{_e(name)}</td><td>{_num(pc.get('dice_mean'), 3)}</td><td>{_num(pc.get('iou_mean'), 3)}</td>"
            f"<td>{_num(pc.get('hd95_mean'), 2)}</td><td>{_e(pc.get('hd95_excluded'))}</td></tr>"
            for name, pc in pcs.items())
    return f"<table>{head}{body}</table>"


def _confusion_table(metrics: Mapping[str, Any]) -> str:
    cm = metrics.get("confusion_matrix")
    classes = metrics.get("classes") or []
    if not cm:
        return ""
    head = "<tr><th class='l'>true \\ predicted</th>" + "".join(f"<th>{_e(c)}</th>" for c in classes) + "</tr>"
    body = "".join(f"<tr><th class='l'>{_e(classes[i])}</th>" + "".join(f"<td>{int(v)}</td>" for v in row) + "</tr>"
                   for i, row in enumerate(cm))
    return f"<table>{head}{body}</table>"


def _caveats(metrics: Mapping[str, Any], data_info: Mapping[str, Any]) -> list[str]:
    n = int(metrics.get("n", 0))
    unit = str(data_info.get("unit") or ("images" if metrics.get("task") == Task.classify else "cases"))
    n_patients = data_info.get("n_patients")
    out: list[str] = []
    if n < 100:
        out.append(f"The test set is small ({n} {unit}), so the confidence intervals are wide and single numbers "
                   "should not be over-interpreted.")
    if n_patients is None:
        out.append("The number of patients in the test set was not recorded.")
    else:
        n_patients = int(n_patients)
        if n_patients < n:
            out.append(f"The {n} test {unit} come from {n_patients} patients. Confidence intervals resample {unit}, "
                       f"not patients; {unit} from the same patient are alike, so the real uncertainty is larger.")
        if n_patients < 30:
            out.append(f"Only {n_patients} patients are represented; results may not carry over to other "
                       "patients, scanners or sites.")
    if metrics.get("task") == Task.classify:
        for name, pc in (metrics.get("per_class") or {}).items():
            if 0 < int(pc.get("support", 0)) < 10:
                out.append(f"Class '{name}' has only {pc['support']} test cases; its per-class numbers are unreliable.")
    out += [str(note) for note in metrics.get("notes") or []]
    out.append("This is a held-out split of the same collection the model was trained on, not an external "
               "validation; it does not establish clinical performance and the model is not for clinical decisions.")
    return out


_LEFT = " class='l'"
_PRIMARY = {Task.classify: ("auroc", "AUROC"), Task.segment: ("dice_mean", "mean Dice")}


def _metric_keys(metrics: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    if metrics.get("task") == Task.classify:
        return [("accuracy", "Accuracy", 2), ("f1_macro", "Macro F1", 2), ("auroc", "AUROC", 2)]
    if metrics.get("layout") == "volumes":
        return [("dice_mean", "Mean Dice", 2), ("hd95_mean", "Mean HD95 (mm)", 1),
                ("surface_dice_mean", f"Mean surface Dice ({float(metrics.get('tolerance_mm', 2.0)):g} mm)", 2)]
    units = metrics.get("hd95_units", "voxels")
    return [("dice_mean", "Mean Dice", 2), ("iou_mean", "Mean IoU", 2), ("hd95_mean", f"Mean HD95 ({units})", 1)]


def _evaluated(baselines: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [b for b in baselines.values() if isinstance(b, Mapping) and b.get("metrics")]


def baseline_table(metrics: Mapping[str, Any], baselines: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model-vs-baselines table: one row per key metric, value (95% CI) per column."""
    shown = _evaluated(baselines)
    header = ["metric", "model"] + [str(b.get("title")) for b in shown]
    rows = [[label, _with_ci(metrics, key, digits)] + [_with_ci(b["metrics"], key, digits) for b in shown]
            for key, label, digits in _metric_keys(metrics)]
    return header, rows


def network_vs_baselines(metrics: Mapping[str, Any], baselines: Mapping[str, Any]) -> str:
    """One plain-language sentence: how much the network adds over the strongest baseline (paired 95% CI)."""
    task = Task(cast(str, metrics.get("task")))
    key, label = _PRIMARY[task]
    shown = _evaluated(baselines)
    if not shown:
        return "No baseline could be evaluated, so it is unknown what the network adds over simple rules."

    def score(b: Mapping[str, Any]) -> float:
        v = b["metrics"].get(key)
        return float(v) if v is not None and math.isfinite(float(v)) else -math.inf

    best = max(shown, key=score)
    model_v, base_v = metrics.get(key), best["metrics"].get(key)
    text = (f"Against the strongest baseline ({best.get('title')}, {label} {_num(base_v)}), the network's {label} "
            f"is {_num(model_v)}")
    diff: Mapping[str, Any] = (best.get("difference") or {}).get(key) or {}
    low: Any = diff.get("low")  # checked below via _num before use
    high: Any = diff.get("high")
    if _num(diff.get("value")) == "n/a" or _num(low) == "n/a":
        return text + "; no paired confidence interval of the difference could be computed."
    text += (f": a difference of {float(diff['value']):+.2f} (paired bootstrap 95% CI {float(low):+.2f} to "
             f"{float(high):+.2f}, the same test cases resampled for both).")
    if float(low) > 0:
        return text + " The network adds something that a simple intensity rule does not capture."
    if float(high) < 0:
        return text + " The network is worse than this simple baseline."
    return text + " On this test set the network is not demonstrably better than this simple baseline."


def _baselines_html(metrics: Mapping[str, Any], baselines: Mapping[str, Any]) -> list[str]:
    header, rows = baseline_table(metrics, baselines)
    def cells(tag: str, values: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}{_LEFT if i == 0 else ''}>{_e(v)}</{tag}>" for i, v in enumerate(values)) + "</tr>"

    head = cells("th", header)
    body = "".join(cells("td", row) for row in rows)
    items = []
    for b in baselines.values():
        if not isinstance(b, Mapping):
            continue
        if b.get("skipped"):
            items.append(f"<li><b>{_e(b.get('title'))}</b>: not evaluated ({_e(b['skipped'])}).</li>")
            continue
        note = (b.get("tuning") or {}).get("note")
        items.append(f"<li><b>{_e(b.get('title'))}</b>: {_e(b.get('description'))}." +
                     (f" {_e(note)}" if note else "") + "</li>")
    return ["<h2>Model vs baselines</h2>",
            f"<p><b>{_e(network_vs_baselines(metrics, baselines))}</b></p>",
            f"<table>{head}{body}</table>",
            "<p class='muted'>Baselines are fitted and tuned on the train and validation splits only, then scored on "
            "the same test cases with the same metrics and bootstrap resamples as the model.</p>",
            f"<ul>{''.join(items)}</ul>"]


_CASE_COLUMNS = (("dice", "Dice", 3), ("hd95_mm", "HD95 (mm)", 1), ("surface_dice", "surface Dice", 3),
                 ("volume_true_ml", "reference (ml)", 2), ("volume_pred_ml", "predicted (ml)", 2),
                 ("otsu_dice", "Otsu Dice", 3))


def case_sections(out_dir: str | Path, cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """HTML sections of a whole-volume evaluation: the per-case table (one row per case and label) and each case's
    3-plane overlay (``case["overlay"]``, a PNG path relative to ``out_dir``). Patients appear as numbers in order of
    appearance (their pseudonyms are in metrics.json and per_case.csv only)."""
    patients: dict[str, int] = {}
    head = ("<tr><th>#</th><th class='l'>case (unit pseudonym)</th><th>patient</th><th>label</th>" +
            "".join(f"<th>{_e(title)}</th>" for _, title, _ in _CASE_COLUMNS) + "</tr>")
    body, figures = [], []
    for row in cases:
        patient = patients.setdefault(str(row.get("patient")), len(patients) + 1)
        for label, values in (row.get("per_label") or {}).items():
            body.append(f"<tr><td>{_e(row.get('case'))}</td><td class='l'><code>{_e(row.get('unit'))}</code></td>"
                        f"<td>{patient}</td><td>{_e(label)}</td>" +
                        "".join(f"<td>{_num(values.get(key), digits)}</td>" for key, _, digits in _CASE_COLUMNS) +
                        "</tr>")
        if row.get("overlay"):
            figures.append(f"<h3>Case #{_e(row.get('case'))}</h3>" +
                           _img(str(Path(out_dir) / str(row["overlay"])), f"case {row.get('case')} overlays"))
    shown = len(figures)
    return ["<h2>Results per case</h2>",
            "<p>Each case scored in its own original voxel grid; HD95 n/a = a mask is empty. The prediction of a case "
            "is <code>predictions/&lt;unit&gt;.nii.gz</code>; patients are numbered within this report.</p>",
            f"<table>{head}{''.join(body)}</table>",
            "<h2>Cases: axial, coronal and sagittal slices</h2>",
            f"<p>Slices through the centre of the reference lesion; green = reference, red = model "
            f"({shown} of {len(cases)} cases shown).</p>", *figures]


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    task: Task | str,
    metrics: dict[str, Any],
    plots: dict[str, str],
    model_info: dict[str, Any],
    data_info: dict[str, Any],
    baselines: Mapping[str, Any] | None = None,
    cases: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``metrics.json`` and a self-contained ``report.html`` into ``out_dir``; return the HTML path.

    ``plots`` maps section names to PNG paths; recognised: ``roc``, ``confusion_matrix``, ``training_curves``,
    ``samples``, ``gradcam`` (others go under "Other figures"). ``data_info`` may hold ``n_patients``, ``unit``,
    ``content_hash``, ``split`` ...; ``model_info`` may hold ``architecture``, ``code_version``, ``config`` ...
    ``baselines`` ({name: entry} from :mod:`medpipe.evaluation.baselines`) adds a "baselines" section to
    metrics.json and a "Model vs baselines" table near the top of the report. ``task`` must be a
    :class:`~medpipe.task.Task` value ("classify" / "segment"). ``cases`` (whole-volume evaluations) adds the
    per-case table and overlays (:func:`case_sections`) in place of the sample panel, and a "cases" list to
    metrics.json.
    """
    task = Task(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics)
    metrics["task"] = task
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    payload: dict[str, Any] = {"title": title, "task": task, "generated_utc": generated, "metrics": metrics,
               "model_info": model_info, "data_info": data_info,
               "plots": {k: Path(v).name for k, v in plots.items() if v}}
    if baselines is not None:
        payload["baselines"] = baselines
    if cases is not None:
        payload["cases"] = list(cases)
    (out / "metrics.json").write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")

    cohort = _cohort(metrics, data_info)
    items = _headline_items(metrics)
    head_html = "".join(f"<p><b>{_e(label)} {_e(value)}</b> {_e(cohort)}<br>"
                        f"<span class='muted'>{_e(label)}: {_e(meaning)}.</span></p>" for label, value, meaning in items)
    ci_blocks: Mapping[str, Any] = metrics.get("ci") or {}
    first_ci: Mapping[str, Any] = next(iter(ci_blocks.values()), {})
    ci_method = first_ci.get("method")
    ci_line = (f"<p class='muted'>95% confidence intervals: {_e(ci_method)} "
               f"({_e(next(iter(metrics['ci'].values())).get('n_boot'))} resamples).</p>") if ci_method else \
        "<p class='muted'>No confidence intervals were computed.</p>"

    sections: list[str] = []
    if baselines:
        sections += _baselines_html(metrics, baselines)
    sections += [f"<h2>Results by {'class' if task == Task.classify else 'label'}</h2>", _per_class_table(metrics)]
    if task == Task.classify:
        sections += ["<h2>Confusion matrix</h2>",
                     "<p>Rows are the reference (true) class, columns the model's prediction; the diagonal is correct.</p>",
                     _confusion_table(metrics), _img(plots.get("confusion_matrix"), "confusion matrix"),
                     "<h2>ROC curves</h2>",
                     "<p>Each curve shows the trade-off between sensitivity and false alarms as the decision "
                     "threshold moves; the closer to the top-left corner, the better.</p>",
                     _img(plots.get("roc"), "ROC curves")]
    sections += ["<h2>Training curves</h2>",
                 "<p>Loss and validation metrics per epoch. Validation loss rising while training loss keeps "
                 "falling suggests over-fitting.</p>", _img(plots.get("training_curves"), "training curves")]
    if cases is not None:
        sections += case_sections(out, cases)
    else:
        sections += ["<h2>Sample predictions</h2>", "<p>A few test cases, numbered in display order only.</p>",
                     _img(plots.get("samples"), "sample predictions")]
    if task == Task.classify or plots.get("gradcam"):
        sections += ["<h2>Grad-CAM</h2>",
                     "<p>Grad-CAM highlights the image regions that most increased the score of the predicted class "
                     "(red = more influence); it shows where the model looked, not whether it was right.</p>",
                     _img(plots.get("gradcam"), "Grad-CAM overlays")]
    known = {"roc", "confusion_matrix", "training_curves", "samples", "gradcam"}
    extra = [(k, v) for k, v in plots.items() if k not in known and v]
    if extra:
        sections.append("<h2>Other figures</h2>")
        sections += [f"<h3>{_e(k)}</h3>{_img(v, k)}" for k, v in extra]

    lineage = {
        "store content hash": data_info.get("content_hash", "not recorded"),
        "code version": model_info.get("code_version", data_info.get("code_version", "not recorded")),
    }
    sections += ["<h2>Data and model lineage</h2>", _kv_table(lineage),
                 "<h3>Data</h3>", _kv_table({k: v for k, v in data_info.items() if k != "content_hash"}),
                 "<h3>Model</h3>", _kv_table({k: v for k, v in model_info.items() if k != "code_version"})]
    sections += ["<h2>Caveats</h2>", "<ul class='caveats'>" +
                 "".join(f"<li>{_e(c)}</li>" for c in _caveats(metrics, data_info)) + "</ul>"]

    doc = html_page(title, f"<p class='muted'>{_e(task)} model evaluation, generated {_e(generated)}</p>"
                           f"<div class='headline'>{head_html}{ci_line}</div>", "\n".join(sections))
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
