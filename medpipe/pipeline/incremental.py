"""What an ingest run changed in the archive: units newly archived, reused from before, removed.

The ingest summary counts what the store holds, not what a run wrote; every archive image records the input tag
it was written for (medpipe.ingest.archive), so comparing the tags before and after a run tells the two apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import zarr

from medpipe.store import StoreError, attrs_of, get_group, open_store


@dataclass(frozen=True)
class IngestDelta:
    """Archive units written by this run (`new`: absent or with other inputs before), kept as they were
    (`reused`), and gone (`removed`)."""

    new: int
    reused: int
    removed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def archive_tags(store_url: str) -> dict[str, str]:
    """unit id -> input tag of every archive image in the store (empty for a missing or new store)."""
    try:
        root = open_store(store_url)
    except StoreError:
        return {}
    if "archive" not in root:
        return {}
    tags = {}
    for name, node in get_group(root, "archive").members():
        if isinstance(node, zarr.Group):
            tags[name] = str(attrs_of(node).get("input_tag", ""))
    return tags


def ingest_delta(before: Mapping[str, str], after: Mapping[str, str]) -> IngestDelta:
    """Compare the archive tags before and after an ingest run."""
    new = sum(1 for unit, tag in after.items() if before.get(unit) != tag)
    return IngestDelta(new=new, reused=len(after) - new, removed=len(set(before) - set(after)))
