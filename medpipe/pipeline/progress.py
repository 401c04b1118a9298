"""Stage announcements: the flow reports each stage's start and outcome here; listeners (the CLI's rich line)
subscribe. In-process only: a deployment's runs log through Prefect instead."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Listener = Callable[[str, str, str], None]  # (stage, status, detail)
_listeners: list[Listener] = []


def announce(stage: str, status: str, detail: str = "") -> None:
    """Tell every listener that `stage` is now `status` ("running", "ran", "skipped", "refused")."""
    for listener in list(_listeners):
        listener(stage, status, detail)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Subscribe `listener` for the duration of the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
