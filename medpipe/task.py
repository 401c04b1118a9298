"""The learning tasks medpipe trains, evaluates and reports on: one name for each, used by every step."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What a model learns from a store: class labels (`classify`), voxel masks (`segment`) or the next samples of
    a signal window (`forecast`, signals stores only)."""

    classify = "classify"
    segment = "segment"
    forecast = "forecast"
