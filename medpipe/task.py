"""The learning tasks medpipe trains, evaluates and reports on: one name for each, used by every step."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What a model learns from a store: class labels (`classify`) or voxel masks (`segment`)."""

    classify = "classify"
    segment = "segment"
