"""Labels manifest: a CSV that says, for files or series folders, their class label, mask and patient.

Columns: path (required; relative to SOURCE, a file or a DICOM series folder), label, mask, patient_id.
Problems (missing file, undeclared class, duplicate row) are collected as issues, never raised, so that
ingestion keeps every image; issues name the CSV line and a keyed hash of the path, never the path itself.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from posixpath import normpath
from typing import Callable

import fsspec

from medpipe.errors import UserError
from medpipe.identifiers import looks_like_identifier

DEFAULT_MANIFEST = "labels.csv"


class ManifestError(UserError, ValueError):
    """The manifest file cannot be used at all (missing, no `path` column)."""


@dataclass(frozen=True)
class ManifestRow:
    """One manifest line."""

    line: int
    path: str
    label: str | None
    mask: str | None
    patient_id: str | None


@dataclass
class Manifest:
    """Rows by normalised relative path, the class list and the issues found."""

    rows: dict[str, ManifestRow] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    issues: list[dict] = field(default_factory=list)

    @property
    def mask_paths(self) -> set[str]:
        return {row.mask for row in self.rows.values() if row.mask}

    def class_index(self, label: str | None) -> int:
        """Index of a class name; -1 for unlabelled (or undeclared, already reported)."""
        if label is None or label not in self.classes:
            return -1
        return self.classes.index(label)


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _norm(path: str) -> str:
    """A manifest path as a normalised relative POSIX path; "" when empty, OUTSIDE when it leaves SOURCE."""
    if not path.strip():
        return ""
    norm = normpath(path.strip().replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "://" in norm:
        return OUTSIDE
    return norm


OUTSIDE = "\x00outside"  # marks a path that leaves SOURCE (path traversal, absolute path): never a file


def parse_manifest(text: str, declared_classes: list[str] | None, hash_path: Callable[[str], str]) -> Manifest:
    """Parse manifest CSV text; classes are the declared ones, else the sorted labels found."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "path" not in [f.strip() for f in reader.fieldnames]:
        raise ManifestError("the labels manifest needs a header row with at least a 'path' column")
    manifest = Manifest()
    labels_seen: set[str] = set()
    for line, raw in enumerate(reader, start=2):
        raw = {k.strip(): v for k, v in raw.items() if k}
        path = _norm(raw.get("path") or "")
        if not path:
            manifest.issues.append({"line": line, "problem": "row without a path"})
            continue
        if path == OUTSIDE:
            manifest.issues.append({"line": line, "problem": "path leaves SOURCE (absolute or ..): row ignored"})
            continue
        mask = _norm(_clean(raw.get("mask")) or "") or None
        if mask == OUTSIDE:
            manifest.issues.append({"line": line, "problem": "mask path leaves SOURCE (absolute or ..): ignored"})
            mask = None
        label = _clean(raw.get("label"))
        if label is not None and looks_like_identifier(label):
            # Labels are stored as written (store attributes, reports): one that could name a person is refused.
            manifest.issues.append({"line": line, "problem": "label looks like a name, ID or date: not used",
                                    "path_hash": hash_path(path)})
            label = None
        row = ManifestRow(line, path, label, mask, _clean(raw.get("patient_id")))
        if path in manifest.rows:
            manifest.issues.append({"line": line, "problem": "duplicate row for a path", "path_hash": hash_path(path)})
            continue
        manifest.rows[path] = row
        if row.label:
            labels_seen.add(row.label)
    manifest.classes = list(declared_classes) if declared_classes else sorted(labels_seen)
    for row in manifest.rows.values():
        if row.label and row.label not in manifest.classes:
            manifest.issues.append({"line": row.line, "problem": "label is not a declared class",
                                    "path_hash": hash_path(row.path)})
    return manifest


def load_manifest(
    fs: fsspec.AbstractFileSystem, root: str, relative: str | None, declared_classes: list[str] | None,
    hash_path: Callable[[str], str],
) -> tuple[Manifest, str | None]:
    """Load the manifest named by `relative` (or SOURCE/labels.csv when present); returns it and its path."""
    explicit = relative is not None
    relative = relative or DEFAULT_MANIFEST
    path = relative if relative.startswith(("/", "s3://")) or "://" in relative else f"{root}/{relative}"
    if not fs.exists(path):
        if explicit:
            raise ManifestError(f"labels manifest not found: {relative}")
        return Manifest(classes=list(declared_classes or [])), None
    text = fs.cat_file(path).decode("utf-8-sig")
    return parse_manifest(text, declared_classes, hash_path), path


def check_references(manifest: Manifest, discovered: set[str], hash_path: Callable[[str], str]) -> None:
    """Report rows whose image (file or folder) or mask is not among the discovered files."""
    folders = {p.rsplit("/", 1)[0] for p in discovered if "/" in p}
    parents: set[str] = set()
    for folder in folders:
        parts = folder.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for row in manifest.rows.values():
        if row.path not in discovered and row.path not in parents:
            manifest.issues.append({"line": row.line, "problem": "file or folder not found", "path_hash": hash_path(row.path)})
        if row.mask and row.mask not in discovered:
            manifest.issues.append({"line": row.line, "problem": "mask file not found", "path_hash": hash_path(row.mask)})
