"""Text to scan for planted PHI: everything a store holds once decoded, and everything Prefect's database holds.

Decoded, not raw: string arrays are compressed on disk, so searching raw chunk bytes for a name proves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

PAGE = 200


def store_text(store: str | Path) -> str:
    """Every attribute document, every decoded string array and every non-zarr file (reports) of a local store."""
    root = zarr.open_group(str(store), mode="r")
    parts: list[str] = []

    def visit(group: zarr.Group) -> None:
        parts.append(json.dumps(dict(group.attrs), default=str))
        for _, array in group.arrays():
            parts.append(json.dumps(dict(array.attrs), default=str))
            if array.dtype.kind in "OUT" or str(array.dtype).startswith("StringDType"):
                parts.append("\x1f".join(map(str, np.asarray(array[...]).ravel().tolist())))
        for _, child in group.groups():
            visit(child)

    visit(root)
    for path in Path(store).rglob("*"):
        if path.is_file() and path.name != "zarr.json" and "/c/" not in path.as_posix() and path.parent.name != "c":
            try:
                parts.append(path.read_text())
            except UnicodeDecodeError:  # a chunk: numeric arrays, covered above when they hold strings
                pass
    return "\n".join(parts)


def prefect_text() -> str:
    """All logs (every page), artifacts, flow-run parameters and task-run names of the current Prefect API."""
    from prefect.client.orchestration import get_client

    parts: list[str] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            logs = client.read_logs(limit=PAGE, offset=offset)
            parts.extend(str(log.message) for log in logs)
            if len(logs) < PAGE:
                break
            offset += PAGE
        parts.extend(json.dumps(a.data, default=str) for a in client.read_artifacts())
        offset = 0
        while True:
            runs = client.read_flow_runs(limit=PAGE, offset=offset)
            parts.extend(json.dumps(r.parameters, default=str) + r.name for r in runs)
            if len(runs) < PAGE:
                break
            offset += PAGE
        offset = 0
        while True:
            tasks = client.read_task_runs(limit=PAGE, offset=offset)
            parts.extend(t.name + json.dumps(t.task_inputs, default=str) for t in tasks)
            if len(tasks) < PAGE:
                break
            offset += PAGE
    return "\n".join(parts)
