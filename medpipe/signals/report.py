"""Signal evaluation report: metrics.json, a self-contained report.html (the conventions and HTML helpers of
medpipe.evaluation.report), figures of true vs predicted windows, and a comparison table of several evaluated runs.

Windows and patients appear as numbers only; metrics.json holds no pseudonyms at all.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import UserError
from medpipe.evaluation.plots import _save, _t, plt
from medpipe.evaluation.report import (_confusion_table, _e, _img, _kv_table, _md_cell, _num,
                                       _per_class_table, _with_ci, html_page, to_jsonable)

__all__ = ["compare_signal_runs", "markdown_signal_summary", "plot_forecast_errors", "plot_forecast_windows",
           "plot_rhythm_windows", "signal_baseline_table", "write_signal_report"]

_STYLES = {"model": ("tab:red", "-"), "persistence": ("0.45", ":"), "seasonal": ("tab:blue", "--")}
_CLASS_ROWS = (("accuracy", "Accuracy"), ("f1_macro", "Macro F1"), ("auroc", "AUROC"))
_FORECAST_ROWS = (("mae", "MAE"), ("rmse", "RMSE"))
_LEFT = " class='l'"
DIGITS = 4  # forecast errors are in mV: a few hundredths


# ---- figures -------------------------------------------------------------------------------------------------------


def plot_forecast_windows(context: np.ndarray, y_true: np.ndarray, forecasts: Mapping[str, np.ndarray],
                          rate_hz: float, leads: Sequence[str], out_path: str | Path, *, lead: int = 0,
                          context_s: float = 2.0) -> str:
    """One panel per window: the last ``context_s`` of the context, the true continuation and every forecast
    (``forecasts``: name -> (n, L, H)) of one lead, against time in seconds from the window start."""
    n, _, tc = context.shape
    h = y_true.shape[2]
    shown = min(tc, max(1, int(round(context_s * rate_hz))))
    t_ctx = np.arange(tc - shown, tc) / rate_hz
    t_fut = np.arange(tc, tc + h) / rate_hz
    fig, axes = plt.subplots(max(n, 1), 1, figsize=(9, 2.1 * max(n, 1)), squeeze=False, sharex=True)
    for i, ax in enumerate(axes[:, 0]):
        if i >= n:
            ax.axis("off")
            continue
        ax.plot(t_ctx, context[i, lead, tc - shown:], color="black", lw=1, label="context")
        ax.plot(t_fut, y_true[i, lead], color="tab:green", lw=2, label="true")
        for name, pred in forecasts.items():
            color, style = _STYLES.get(name, ("tab:purple", "-."))
            ax.plot(t_fut, pred[i, lead], color=color, ls=style, lw=1.3, label=_t(name))
        ax.axvline(tc / rate_hz, color="0.7", lw=0.8)
        ax.set_title(f"window #{i + 1}, lead {_t(leads[lead])}", fontsize=9)
        ax.set_ylabel("mV")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=len(forecasts) + 2, loc="upper left")
    axes[-1, 0].set_xlabel("seconds from window start")
    fig.suptitle("True vs predicted continuation (grey line: end of the context)", fontsize=10)
    return _save(fig, out_path)


def plot_rhythm_windows(windows: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray, classes: Sequence[str],
                        rate_hz: float, lead_name: str, out_path: str | Path) -> str:
    """Lead 0 of a few windows (n, L, T), titled with the true and predicted rhythm (green right, red wrong)."""
    n = len(windows)
    cols = 2 if n > 1 else 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.axis("off")
            continue
        pred, true = int(np.argmax(y_prob[i])), int(y_true[i])
        ax.plot(np.arange(windows.shape[2]) / rate_hz, windows[i, 0], color="black", lw=0.8)
        ax.set_title(f"#{i + 1} true: {_t(classes[true])}, predicted: {_t(classes[pred])} (p={y_prob[i, pred]:.2f})",
                     fontsize=8, color="darkgreen" if pred == true else "firebrick")
        ax.set_xlabel("s", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Test windows, lead {_t(lead_name)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_forecast_errors(metrics: Mapping[str, Any], out_path: str | Path) -> str:
    """MAE and RMSE of the model and each baseline with their patient-bootstrap 95% CIs as error bars."""
    forecasters = metrics["forecasters"]
    names = list(forecasters)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (key, label) in zip(axes, _FORECAST_ROWS):
        values = np.array([float(forecasters[n][key]) for n in names])
        low = np.array([_finite(forecasters[n]["ci"][key].get("low"), v) for n, v in zip(names, values)])
        high = np.array([_finite(forecasters[n]["ci"][key].get("high"), v) for n, v in zip(names, values)])
        colors = [_STYLES.get(n, ("tab:purple", "-"))[0] for n in names]
        ax.bar(range(len(names)), values, color=colors,
               yerr=np.vstack([np.maximum(values - low, 0), np.maximum(high - values, 0)]), capsize=4)
        ax.set_xticks(range(len(names)), [_t(n) for n in names])
        ax.set_ylabel(f"{label} (mV)")
        ax.set_title(f"{label}, lower is better", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)


def _finite(x: Any, default: float) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else default


# ---- tables --------------------------------------------------------------------------------------------------------


def _diff(d: Mapping[str, Any] | None, digits: int) -> str:
    if not d or _num(d.get("value"), digits) == "n/a":
        return "n/a"
    text = f"{float(d['value']):+.{digits}f}"
    if _num(d.get("low")) == "n/a":
        return text
    level = int(round(100 * float(d.get("level", 0.95))))
    return f"{text} ({level}% CI {float(d['low']):+.{digits}f} to {float(d['high']):+.{digits}f})"


def signal_baseline_table(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each key metric of the model and its baselines with 95% CIs, and model - baseline."""
    if metrics.get("task") == "classify":
        base = [(b["title"], b) for b in (metrics.get("baselines") or {}).values() if b.get("metrics")]
        header = ["metric", "model"] + [t for t, _ in base] + [f"model \u2212 {t}" for t, _ in base]
        rows = [[label, _with_ci(metrics, key)] + [_with_ci(b["metrics"], key) for _, b in base] +
                [_diff((b.get("difference") or {}).get(key), 2) for _, b in base] for key, label in _CLASS_ROWS]
        return header, rows
    forecasters = metrics["forecasters"]
    others = [n for n in forecasters if n != "model"]
    header = (["metric"] + [forecasters[n]["title"] for n in forecasters] +
              [f"model \u2212 {n}" for n in others])
    rows = [[f"{label} ({_unit(metrics)})"] + [_with_ci(forecasters[n], key, DIGITS) for n in forecasters] +
            [_diff(metrics["differences"][n][key], DIGITS) for n in others] for key, label in _FORECAST_ROWS]
    return header, rows


def _unit(metrics: Mapping[str, Any]) -> str:
    units = sorted({str(u) for u in metrics.get("units") or [] if u})
    return "/".join(units) if units else "signal units"


def _verdicts(metrics: Mapping[str, Any]) -> list[str]:
    """Plain-language sentences: does the model beat each baseline (the paired CI of the difference)?"""
    n_p = metrics.get("n_patients")
    if metrics.get("task") == "classify":
        major = (metrics.get("baselines") or {}).get("majority") or {}
        if not major.get("metrics"):
            return [f"The majority-class baseline could not be evaluated ({major.get('skipped', 'no train labels')})."]
        verdict = "beats" if metrics.get("beats_majority") else "does not demonstrably beat"
        return [f"Accuracy {_with_ci(metrics, 'accuracy')} vs {_with_ci(major['metrics'], 'accuracy')} for always "
                f"predicting '{major['tuning']['class']}': the model {verdict} the majority class "
                f"(difference {_diff(major['difference']['accuracy'], 2)}, {n_p} test patients resampled)."]
    out = []
    for name in (n for n in metrics["forecasters"] if n != "model"):
        beats = metrics.get(f"beats_{name}")
        verdict = "beats" if beats else "does not demonstrably beat"
        out.append(f"MAE {_with_ci(metrics['forecasters']['model'], 'mae', DIGITS)} vs "
                   f"{_with_ci(metrics['forecasters'][name], 'mae', DIGITS)} for "
                   f"{metrics['forecasters'][name]['title']}: the model {verdict} it (MAE difference "
                   f"{_diff(metrics['differences'][name]['mae'], DIGITS)}; RMSE difference "
                   f"{_diff(metrics['differences'][name]['rmse'], DIGITS)}).")
    return out


def _per_lead_table(metrics: Mapping[str, Any]) -> str:
    forecasters = metrics["forecasters"]
    leads = list(forecasters["model"]["per_lead"])
    head = "<tr><th class='l'>lead</th>" + "".join(
        f"<th>{_e(label)} {_e(forecasters[n]['title'])}</th>" for _, label in _FORECAST_ROWS for n in forecasters) + \
        "</tr>"
    body = "".join(f"<tr><td class='l'>{_e(lead)}</td>" + "".join(
        f"<td>{_e(_with_ci(forecasters[n]['per_lead'][lead], key, DIGITS))}</td>" for key, _ in _FORECAST_ROWS
        for n in forecasters) + "</tr>" for lead in leads)
    return f"<table>{head}{body}</table>"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}{_LEFT if i == 0 else ''}>{_e(v)}</{tag}>"
                                for i, v in enumerate(values)) + "</tr>"
    return "<table>" + cells("th", header) + "".join(cells("td", r) for r in rows) + "</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows])


def markdown_signal_summary(metrics: Mapping[str, Any]) -> str:
    """Markdown of the model-vs-baselines table and verdicts (for a Prefect artifact)."""
    header, rows = signal_baseline_table(metrics)
    lines = [f"# medpipe signal evaluation ({metrics.get('task')})", "",
             f"Test set: **{metrics.get('n_windows')}** windows from **{metrics.get('n_patients')}** patients; "
             "95% CIs resample patients.", ""]
    return "\n".join(lines + _md_table(header, rows) + [""] + [_md_cell(v) for v in _verdicts(metrics)])


# ---- the report ----------------------------------------------------------------------------------------------------


def _caveats(metrics: Mapping[str, Any]) -> list[str]:
    n_p = int(metrics.get("n_patients") or 0)
    out = [f"Confidence intervals resample the {n_p} test patients (all windows of a drawn patient together), "
           "because windows of one patient are alike; resampling windows would understate the uncertainty."]
    if n_p < 30:
        out.append(f"Only {n_p} test patients: the intervals are wide and results may not carry over to other "
                   "patients, devices or sites.")
    out += [str(n) for n in metrics.get("notes") or []]
    out.append("This is a held-out split of the same collection the model was trained on, not an external "
               "validation; it does not establish clinical performance and the model is not for clinical decisions.")
    return out


def write_signal_report(out_dir: str | Path, *, metrics: Mapping[str, Any], plots: Mapping[str, str],
                        model_info: Mapping[str, Any], data_info: Mapping[str, Any], title: str | None = None) -> Path:
    """Write metrics.json ({title, task, generated_utc, metrics, model_info, data_info, plots}) and a
    self-contained report.html into ``out_dir``; return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = str(metrics.get("task"))
    name = model_info.get("model_name") or "model"
    title = title or f"medpipe signal evaluation: {name} ({'rhythm' if task == 'classify' else task}) " \
                     f"on the {data_info.get('split', 'test')} split"
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"title": title, "task": task, "generated_utc": generated, "metrics": metrics,
               "model_info": model_info, "data_info": data_info,
               "plots": {k: Path(v).name for k, v in plots.items() if v}}
    (out / "metrics.json").write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")

    boot = metrics.get("bootstrap") or {}
    header, rows = signal_baseline_table(metrics)
    sections = [f"<div class='headline'>{''.join(f'<p><b>{_e(v)}</b></p>' for v in _verdicts(metrics))}"
                f"<p class='muted'>{_e(metrics.get('n_windows'))} test windows from {_e(metrics.get('n_patients'))} "
                f"patients. 95% confidence intervals: percentile bootstrap over patients "
                f"({_e(boot.get('n_boot'))} resamples of {_e(boot.get('n_units'))} patients); differences are "
                "paired (the same resamples for the model and the baseline).</p></div>",
                "<h2>Model vs baselines</h2>", _html_table(header, rows)]
    if task == "classify":
        sections += ["<h2>Results by rhythm class</h2>", _per_class_table(metrics),
                     "<h2>Confusion matrix</h2>", "<p>Rows are the reference rhythm, columns the prediction.</p>",
                     _confusion_table(metrics), _img(plots.get("confusion_matrix"), "confusion matrix"),
                     "<h2>ROC curves</h2>", _img(plots.get("roc"), "ROC curves")]
        if plots.get("windows"):
            sections += ["<h2>Test windows</h2>", _img(plots.get("windows"), "test windows")]
    else:
        period = metrics.get("seasonal_period_s") or {}
        sections += [f"<p class='muted'>Forecast: the last {_num(metrics.get('horizon_s'), 2)} s "
                     f"({_e(metrics.get('horizon'))} samples at {_num(metrics.get('rate_hz'), 0)} Hz) of each window "
                     f"from the {_e(metrics.get('context_samples'))} samples before it. Persistence holds the last "
                     f"context value; the seasonal baseline repeats the previous beat, its period found per window by "
                     f"{_e(period.get('search'))} (median {_num(period.get('median'), 2)} s).</p>",
                     _img(plots.get("errors"), "errors with confidence intervals"),
                     "<h2>Error per lead</h2>", _per_lead_table(metrics),
                     "<h2>True vs predicted windows</h2>", _img(plots.get("windows"), "forecast windows")]
    if plots.get("training_curves"):
        sections += ["<h2>Training curves</h2>", _img(plots.get("training_curves"), "training curves")]
    sections += ["<h2>Data and model</h2>", "<h3>Data</h3>", _kv_table(dict(data_info)),
                 "<h3>Model</h3>", _kv_table(dict(model_info)),
                 "<h2>Caveats</h2>", "<ul class='caveats'>" + "".join(f"<li>{_e(c)}</li>" for c in _caveats(metrics))
                 + "</ul>"]
    doc = html_page(title, f"<p class='muted'>generated {_e(generated)}</p>", "\n".join(sections))
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


# ---- comparison of runs --------------------------------------------------------------------------------------------


def _read_evaluation(eval_dir: str | Path) -> dict[str, Any]:
    path = Path(eval_dir) / "metrics.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{eval_dir}: no metrics.json (evaluate the run first)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("task") not in ("classify", "forecast"):
        raise UserError(f"{path}: not a signal evaluation (no classify/forecast task)")
    return payload


def _comparison_row(run: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    m, info = payload["metrics"], payload.get("model_info") or {}
    row: dict[str, Any] = {"run": run, "model": info.get("model_name"), "task": payload["task"],
                           "params": info.get("params"), "train_seconds": info.get("train_seconds")}
    if payload["task"] == "classify":
        major = (m.get("baselines") or {}).get("majority") or {}
        row.update(metric="accuracy", value=m.get("accuracy"), ci=(m.get("ci") or {}).get("accuracy"),
                   baseline=major.get("title"), baseline_value=(major.get("metrics") or {}).get("accuracy"),
                   difference=(major.get("difference") or {}).get("accuracy"), auroc=m.get("auroc"),
                   beats_baselines=bool(m.get("beats_majority")))
        return row
    others = {n: f for n, f in m["forecasters"].items() if n != "model"}
    best = min(others, key=lambda n: _finite(others[n].get("mae"), math.inf))
    row.update(metric="MAE", value=m.get("mae"), ci=(m.get("ci") or {}).get("mae"), baseline=others[best]["title"],
               baseline_value=others[best].get("mae"), difference=m["differences"][best]["mae"], rmse=m.get("rmse"),
               beats_baselines=all(bool(m.get(f"beats_{n}")) for n in others))
    return row


_COMPARE_COLUMNS = ("run", "model", "task", "params", "metric (95% CI)", "best baseline", "model \u2212 baseline",
                    "beats baselines", "other", "training s")


def _row_cells(row: Mapping[str, Any]) -> list[str]:
    digits = 2 if row["task"] == "classify" else DIGITS
    ci = row.get("ci") or {}
    value = _with_ci({row["metric"]: row["value"], "ci": {row["metric"]: ci}}, row["metric"], digits)
    other = f"AUROC {_num(row.get('auroc'))}" if row["task"] == "classify" else f"RMSE {_num(row.get('rmse'), DIGITS)}"
    params = row.get("params")
    return [str(row["run"]), str(row.get("model")), "rhythm" if row["task"] == "classify" else "forecast",
            f"{int(params):,}" if isinstance(params, (int, float)) else "n/a", f"{row['metric']} {value}",
            f"{row.get('baseline')} {_num(row.get('baseline_value'), digits)}", _diff(row.get("difference"), digits),
            "yes" if row.get("beats_baselines") else "no", other, _num(row.get("train_seconds"), 1)]


def compare_signal_runs(eval_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write comparison.md and comparison.html in ``out_dir``: one row per evaluated run (a folder holding the
    metrics.json of :func:`write_signal_report`) with its model, parameters, main metric (rhythm: accuracy; forecast:
    MAE) with 95% CI, the best baseline, the paired difference and training seconds. Returns {"rows", "markdown" (the
    table's text), "markdown_path", "html"}; a missing or foreign metrics.json is a one-line UserError."""
    if not eval_dirs:
        raise UserError("compare needs at least one evaluated run folder")
    rows = [_comparison_row(_run_name(Path(d)), _read_evaluation(d)) for d in eval_dirs]
    cells = [_row_cells(r) for r in rows]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = ("Main metric: accuracy for rhythm (baseline: majority class), MAE for forecasting (baseline: the better "
            "of persistence and previous beat); 95% CIs resample test patients. Runs are comparable only on the same "
            "store and split.")
    md = out / "comparison.md"
    text = "\n".join(["# Signal model comparison", "", *_md_table(list(_COMPARE_COLUMNS), cells), "", note]) + "\n"
    md.write_text(text)
    html_path = out / "comparison.html"
    html_path.write_text(html_page("Signal model comparison", "", f"{_html_table(list(_COMPARE_COLUMNS), cells)}"
                                   f"<p class='muted'>{_e(note)}</p>"), encoding="utf-8")
    return {"rows": to_jsonable(rows), "markdown": text, "markdown_path": str(md), "html": str(html_path)}


def _run_name(eval_dir: Path) -> str:
    """A run's name in the comparison: its folder (the run folder when given its `evaluation/` subfolder)."""
    folder = eval_dir.parent if eval_dir.name == "evaluation" else eval_dir
    return folder.name or str(eval_dir)
