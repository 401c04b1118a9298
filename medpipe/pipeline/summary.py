"""The end of a pipeline run, for people: headline metrics with CIs, a table for the CLI, a markdown artifact."""

from __future__ import annotations

from typing import Any, Mapping


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """{name: {value, low, high}} for every metric of an evaluation that carries a 95% CI (metrics.json)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, ci in (metrics.get("ci") or {}).items():
        value = metrics.get(name)
        if isinstance(value, (int, float)) and isinstance(ci, Mapping):
            out[name] = {"value": float(value), "low": _float(ci.get("low")), "high": _float(ci.get("high"))}
    return out


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def format_headline(headline: Mapping[str, Mapping[str, float | None]]) -> str:
    """`accuracy 0.812 (0.700-0.900), auroc ...`."""
    parts = []
    for name, m in headline.items():
        ci = f" ({m['low']:.3f}-{m['high']:.3f})" if m.get("low") is not None and m.get("high") is not None else ""
        parts.append(f"{name} {m['value']:.3f}{ci}")
    return ", ".join(parts)


def stage_detail(stage: str, entry: Mapping[str, Any]) -> str:
    """One line on what a stage produced (counts, metrics, where its report is)."""
    s = entry.get("summary") or {}
    if entry.get("status") == "refused":
        return str(entry.get("reason", ""))
    if stage == "ingest":
        return (f"{s.get('accounting', '')}; {s.get('new_units', 0)} units newly archived, "
                f"{s.get('reused_units', 0)} reused; {s.get('samples', 0)} training samples")
    if stage in ("train", "retrain"):
        line = f"model {s.get('model')} (sha256 {str(s.get('sha256', ''))[:12]}, {s.get('epochs')} epochs)"
        if s.get("headline"):
            line += f"; {format_headline(s['headline'])}; report {s.get('report')}"
        return line
    if stage == "evaluate":
        return f"{format_headline(s.get('headline') or {})}; report {s.get('report')}"
    if stage == "augment":
        return f"{s.get('n_samples')} synthetic samples published; report {s.get('report')}"
    if stage == "promote":
        promoted = s.get("promoted")
        return (f"promoted {promoted['stage']} model {promoted['model']}" if promoted else
                f"nothing promoted: {s.get('reason', '')}") + f"; comparison {s.get('report')}"
    if stage == "predict":
        return f"{s.get('cases')} prediction(s), {s.get('new')} new -> {s.get('predictions')}"
    return ""


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, status, what it produced) for each stage of a pipeline result (OUTPUT/pipeline.json)."""
    return [(stage, str(entry.get("status")), stage_detail(stage, entry))
            for stage, entry in (result.get("stages") or {}).items()]


def pipeline_markdown(result: Mapping[str, Any]) -> str:
    """The `pipeline` artifact: the stage table, then the lineage from store to predictions."""
    rows = ["| stage | status | key | result |", "|---|---|---|---|"]
    for stage, status, detail in summary_rows(result):
        key = str((result["stages"][stage]).get("key", ""))[:12]
        rows.append(f"| {stage} | {status} | `{key}` | {_cell(detail)} |")
    lineage = result.get("lineage") or {}
    lines = ["# medpipe pipeline", "", f"store content hash `{result.get('store_content_hash')}`", "", *rows, "",
             "## Lineage", "", f"- store `{lineage.get('store_content_hash')}`"]
    for name, c in (lineage.get("checkpoints") or {}).items():
        lines.append(f"  - {name} checkpoint `{c.get('url')}` (sha256 `{c.get('sha256')}`)")
    for name, r in (lineage.get("reports") or {}).items():
        lines.append(f"    - {name} report `{r.get('url')}`")
    predictions = lineage.get("predictions")
    if predictions:
        lines.append(f"      - predictions `{predictions.get('url')}` (model sha256 `{predictions.get('model_sha256')}`)")
    promoted = result.get("promoted")
    lines += ["", f"promoted model: `{promoted['model']}`" if promoted else "promoted model: none"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
