"""Human-readable summaries of a store (markdown for Prefect artifacts, rich tables for the CLI). No PHI:
everything here comes from the store summary, which holds counts, pseudonyms and hashes only."""

from __future__ import annotations

from typing import Any


def ingest_markdown(summary: dict[str, Any]) -> str:
    """Markdown: accounting line, counts, quarantine reasons, splits and the per-modality fingerprint."""
    lines = ["# medpipe ingest", "", f"**{summary['accounting']}**", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["counts"].items()]
    lines += ["", "## Quarantine reasons", "", "| reason | files |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary.get("quarantine_reasons", {}).items())] or ["| none | 0 |"]
    lines += ["", "## Splits (samples)", "", "| split | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.get("splits", {}).items()]
    lines += ["", "## Fingerprint", "", "| modality | images | median spacing | median shape | p0.5 / p99.5 |",
              "|---|---|---|---|---|"]
    for modality, entry in summary.get("fingerprint", {}).get("modalities", {}).items():
        inten = entry.get("intensity") or {}
        window = f"{inten.get('p00_5', '')} / {inten.get('p99_5', '')}" if inten else "-"
        lines.append(f"| {modality} | {entry['images']} | {entry['spacing_median']} | {entry['shape_median']} | {window} |")
    lines += ["", f"content hash `{summary.get('content_hash', '')}`"]
    return "\n".join(lines)


def signal_ingest_markdown(summary: dict[str, Any]) -> str:
    """Markdown of a signal ingest: counts, quarantine reasons, store facts and windows per split."""
    lines = ["# medpipe ingest-signals", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["counts"].items()]
    lines += ["", "## Quarantine reasons", "", "| reason | records |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary.get("quarantine_reasons", {}).items())] or ["| none | 0 |"]
    lines += ["", "## Store", "", f"{len(summary['leads'])} leads ({', '.join(summary['leads'])}), units "
              f"{', '.join(sorted(set(summary['units'])))}, {summary['rate_hz']:g} Hz, windows of {summary['window']} "
              f"samples every {summary['stride']}; classes: {', '.join(summary['classes']) or 'none'}",
              "", "| split | windows |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.get("split_counts", {}).items()]
    lines += ["", f"content hash `{summary.get('content_hash', '')}`"]
    return "\n".join(lines)
