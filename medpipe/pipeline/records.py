"""What each stage of a pipeline run reports (the `stages` of OUTPUT/pipeline.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ran", "skipped", "refused"]


@dataclass(frozen=True)
class StageRecord:
    """One stage's outcome: `status`, its `key`, the published `outputs` (URLs that exist after the run), a
    JSON-able `summary` (numbers and URLs only: nothing identifying) and, when refused, the `reason`."""

    stage: str
    status: Status
    key: str
    outputs: tuple[str, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "key": self.key, "outputs": list(self.outputs),
                               "summary": self.summary}
        if self.reason:
            out["reason"] = self.reason
        return out
