"""The ledger: OUTPUT/ledger/<stage>.json maps stage keys to the outputs they published.

A stage is skipped when its key is in the ledger and every output listed there still exists. Entries are written
only after the outputs are published, so an interrupted stage is simply run again. Writes happen under the
pipeline's lock on OUTPUT (one run at a time).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from medpipe.pipeline.publish import join_url, read_json_url, url_exists, write_json_url

LEDGER_DIR = "ledger"


@dataclass(frozen=True)
class LedgerEntry:
    """What one run of a stage published, under its key."""

    key: str
    outputs: tuple[str, ...]
    summary: dict[str, Any] = field(default_factory=dict)
    recorded_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), "summary": self.summary, "recorded_at": self.recorded_at}


def ledger_url(output: str, stage: str) -> str:
    """Where the ledger of `stage` lives under OUTPUT."""
    return join_url(output, LEDGER_DIR, f"{stage}.json")


def read_ledger(output: str, stage: str) -> dict[str, LedgerEntry]:
    """Every entry of a stage's ledger (empty when there is none yet)."""
    data = read_json_url(ledger_url(output, stage)) or {}
    return {key: LedgerEntry(key, tuple(e.get("outputs") or ()), dict(e.get("summary") or {}),
                             str(e.get("recorded_at") or "")) for key, e in data.items()}


def find_done(output: str, stage: str, key: str) -> LedgerEntry | None:
    """The entry for `key` when it exists and all its outputs still exist (the stage can be skipped), else None."""
    entry = read_ledger(output, stage).get(key)
    if entry is None or not all(url_exists(url) for url in entry.outputs):
        return None
    return entry


def record(output: str, stage: str, key: str, outputs: list[str], summary: dict[str, Any]) -> LedgerEntry:
    """Add (or replace) the entry for `key` in the stage's ledger; returns it."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry = LedgerEntry(key, tuple(outputs), summary, now)
    entries = {k: e.to_dict() for k, e in read_ledger(output, stage).items()}
    entries[key] = entry.to_dict()
    write_json_url(ledger_url(output, stage), entries)
    return entry


def latest_with(output: str, stage: str, field_name: str, value: Any) -> LedgerEntry | None:
    """The most recent entry whose summary has `field_name` == `value` and whose outputs exist, else None (e.g. the
    last predictions of a model: a new run continues from them)."""
    entries = sorted((e for e in read_ledger(output, stage).values() if e.summary.get(field_name) == value),
                     key=lambda e: e.recorded_at, reverse=True)
    return next((e for e in entries if all(url_exists(url) for url in e.outputs)), None)
