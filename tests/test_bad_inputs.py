"""Ingest the bad-input corpus (tests/bad_inputs.py) as a 3D and as a 2D dataset through the Prefect flow, and check
that the run completes, that every file is accounted for with the right reason, that exclusions, manifest issues and
links are reported, and that none of the planted PHI reaches the store (decoded), its file names, its reports or
Prefect's database (every log page, artifacts, flow-run parameters, task runs)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.deid import DeidKey, Pseudonymizer
from medpipe.store import read_json, store_attrs
from tests.bad_inputs import BadCorpus, write_bad_inputs

pytestmark = pytest.mark.slow
CLASSES = ["none", "lesion"]
KINDS = {"3d": (8, 16, 16), "2d": (16, 16)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> BadCorpus:
    return write_bad_inputs(tmp_path_factory.mktemp("bad-inputs") / "source")


@pytest.fixture(scope="module")
def runs(prefect_api, corpus, tmp_path_factory, deid_key_module) -> dict[str, tuple[Path, Any]]:
    """One ingest per dataset kind; an exception is kept (not raised) so that each test can say what it means."""
    from flows.ingest import run_ingest

    out: dict[str, tuple[Path, Any]] = {}
    stores = tmp_path_factory.mktemp("bad-stores")
    for kind, shape in KINDS.items():
        store = stores / f"{kind}.zarr"
        config = IngestConfig(classes=CLASSES, manifest=corpus.manifest, files_per_shard=16,
                              preprocess=PreprocessConfig(kind=kind, shape=shape))
        try:
            result: Any = run_ingest(str(corpus.root), str(store), config)
        except BaseException as exc:  # noqa: BLE001 - an aborted run is what test_run_completes reports
            if isinstance(exc, KeyboardInterrupt):
                raise
            result = exc
        out[kind] = (store, result)
    return out


@pytest.fixture(scope="module")
def pseudonyms(deid_key_module) -> Pseudonymizer:
    return Pseudonymizer(DeidKey(deid_key_module.encode()))


def _completed(runs, kind: str) -> tuple[Path, dict[str, Any]]:
    store, result = runs[kind]
    if isinstance(result, BaseException):
        pytest.fail(f"the {kind} ingest aborted: {type(result).__name__}: {result}")
    return store, result


def _hash(pseudonyms: Pseudonymizer, path: str) -> str | None:
    """The keyed hash medpipe stores for a listed path; None when the path cannot be hashed as text (bytes that
    are not UTF-8: how medpipe hashes those is its own choice)."""
    try:
        return pseudonyms.path(path)
    except UnicodeEncodeError:
        return None


# --------------------------------------------------------------------------------------------------------------
# the corpus itself
# --------------------------------------------------------------------------------------------------------------


def test_corpus_is_small_fast_and_covers_the_kinds(corpus):
    kinds = {c.what for c in corpus.cases}
    assert len(kinds) >= 30
    assert corpus.total_bytes < 5 << 20
    assert corpus.discovered == corpus.ingested_min + sum(corpus.expected_reasons.values())
    assert {"too_large", "non_finite_pixels", "duplicate_instance", "mask_shape_mismatch", "mask_without_image",
            "not_dicom", "unsupported_format", "unreadable_image", "unreadable_nifti", "truncated", "no_pixel_data",
            "non_image_dicom"} <= set(corpus.expected_reasons)
    assert all(len(v) >= 5 for v in corpus.phi)
    assert any(re.search("[\udc80-\udcff]", c.path) for c in corpus.cases)  # names that are not valid UTF-8


# --------------------------------------------------------------------------------------------------------------
# accounting, reasons, exclusions, manifest issues, links
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_run_completes(runs, kind):
    store, result = _completed(runs, kind)
    attrs = store_attrs(str(store))
    assert attrs.get("complete") is True, "the store is not marked complete"
    assert not result.get("aborted"), "the run reports itself aborted"
    assert "not_ingested" not in result["quarantine_reasons"], "files no step took (a bookkeeping bug)"


@pytest.mark.parametrize("kind", KINDS)
def test_accounting(runs, corpus, kind):
    store, result = _completed(runs, kind)
    counts = result["counts"]
    assert counts["discovered"] == counts["ingested"] + counts["quarantined"]
    assert counts["discovered"] == corpus.discovered, (
        "discovered: hidden files, the manifest and links leaving SOURCE are not listed; a link inside SOURCE is "
        "followed and each real file is listed once, under its first path in sorted order")
    assert counts["ingested"] == corpus.ingested_min
    quarantine = read_json(str(store), "reports/quarantine.json")
    assert quarantine is not None and len(quarantine) == counts["quarantined"]


@pytest.mark.parametrize("kind", KINDS)
def test_quarantine_reasons(runs, corpus, pseudonyms, kind):
    store, result = _completed(runs, kind)
    # file by file first: the message names what went wrong where
    by_hash = {h: c for c in corpus.cases if (h := _hash(pseudonyms, c.path))}
    quarantine = read_json(str(store), "reports/quarantine.json") or []
    got = {q["source_hash"]: q["reason"] for q in quarantine}
    wrong = []
    for h, case in by_hash.items():
        if not case.listed:
            if h in got:
                wrong.append(f"{case.path!r} ({case.what}): not to be listed, quarantined as {got[h]}")
        elif got.get(h, "") != case.reason:
            wrong.append(f"{case.path!r} ({case.what}): want {case.reason or 'ingested'}, got "
                         f"{got.get(h) or 'ingested'}")
    unknown = sorted(reason for h, reason in got.items() if h not in by_hash)
    unhashable = [c for c in corpus.cases if c.listed and _hash(pseudonyms, c.path) is None]
    if len(unknown) > len([c for c in unhashable if c.reason]):
        wrong.append(f"quarantined files of no known path: {unknown}")
    assert not wrong, "\n".join(wrong)
    assert result["quarantine_reasons"] == corpus.expected_reasons


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_from_training(runs, corpus, pseudonyms, kind):
    store, result = _completed(runs, kind)
    excluded = read_json(str(store), "reports/excluded.json")
    assert excluded is not None and len(excluded) >= corpus.excluded_min[kind]
    assert result["counts"]["excluded_from_training"] == len(excluded)
    assert all(e.get("reason") for e in excluded), "every exclusion says why"
    wrong_dims = 2 if kind == "3d" else 3
    units = {e["unit"] for e in excluded}
    for case in corpus.units(wrong_dims):
        unit = _hash(pseudonyms, case.path)
        if unit is not None:
            assert unit in units, f"{case.path} ({case.what}) is not excluded from the {kind} training arrays"
    named = "single_slice.nii.gz" if kind == "3d" else "volume.nii.gz"
    case = next(c for c in corpus.cases if c.path.endswith("/" + named))
    assert pseudonyms.path(case.path) in units


@pytest.mark.parametrize("kind", KINDS)
def test_training_arrays_are_finite(runs, kind):
    store, result = _completed(runs, kind)
    root = zarr.open_group(str(store), mode="r")
    assert result["samples"] > 0
    if result["layout"] == "volumes":  # 3D: one array per case (excluded cases, split -1, may have none)
        from medpipe.volumes import open_case

        split = root["samples/split"][...]
        images = [open_case(root, i).image[...] for i in range(result["samples"]) if split[i] >= 0]
        assert images, "no 3D case was stored"
    else:
        images = [root["training/images"][...]]
        assert images[0].shape[0] == result["samples"]
    assert all(np.isfinite(x).all() for x in images), "a non-finite pixel reached the training arrays"


def test_notes_for_some_non_finite_pixels(runs, corpus, pseudonyms):
    store, _ = _completed(runs, "3d")
    units = {u["unit"]: u for u in read_json(str(store), "reports/units.json") or []}
    for case in [c for c in corpus.cases if c.notes]:
        unit = units.get(pseudonyms.path(case.path))
        assert unit is not None, f"{case.path} ({case.what}) is not an archive unit"
        assert unit["notes"], f"{case.path} ({case.what}) has no note"


def test_manifest_issues_and_labels(runs, corpus, pseudonyms):
    store, _ = _completed(runs, "3d")
    issues = read_json(str(store), "reports/manifest_issues.json") or []
    lines = {i.get("line") for i in issues}
    missing = {what: line for what, line in corpus.manifest_issue_lines.items() if line not in lines}
    assert not missing, f"manifest issues not reported: {missing}; reported: {issues}"
    assert all(set(i) <= {"line", "problem", "path_hash", "mask_hash", "column"} for i in issues), (
        f"a manifest issue carries a value from the manifest: {[sorted(i) for i in issues]}")

    def label_of(rel: str) -> Any:
        group = zarr.open_group(str(store / "archive" / pseudonyms.path(rel)), mode="r")
        return dict(group.attrs)["medpipe"]["label"]

    wrong = []
    for case in corpus.cases:  # identifier-like labels and the traversal row label nothing; first row wins
        if case.listed and case.unit_dims and not case.reason and _hash(pseudonyms, case.path):
            try:
                label = label_of(case.path)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
                wrong.append(f"{case.path!r} ({case.what}): no archive unit")
                continue
            if label != case.label:
                wrong.append(f"{case.path!r} ({case.what}): label {label!r}, want {case.label!r}")
    assert not wrong, "\n".join(wrong)


def test_links_leaving_source_are_reported(runs, corpus):
    store, _ = _completed(runs, "3d")
    links = read_json(str(store), "reports/links.json")
    assert links is not None, "reports/links.json is missing"
    assert len(links) >= len(corpus.external_links), links


def test_collisions_reported(runs, corpus):
    _, result = _completed(runs, "3d")
    assert result["assembly"]["uid_collisions"] == corpus.collision_pairs


# --------------------------------------------------------------------------------------------------------------
# strict JSON and PHI
# --------------------------------------------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", KINDS)
def test_json_documents_are_strict(runs, kind):
    store, _ = _completed(runs, kind)
    _strict((store / "zarr.json").read_text())  # the root attributes: fingerprint, counts, ...
    bad = []
    for path in sorted(store.rglob("*.json")):
        try:
            _strict(path.read_text())
        except ValueError as exc:
            bad.append(f"{path.relative_to(store)}: {exc}")
    assert not bad, "\n".join(bad)


def _strings(value: Any) -> list[str]:
    """Every key and string value of a decoded JSON document."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _store_texts(store: Path) -> dict[str, str]:
    """What a reader of the store can see, decoded: attributes and string arrays, every JSON document decoded
    (non-ASCII escapes undone), the raw bytes of the reports, and the name of every file and folder."""
    from tests.phi_scan import store_text

    texts = {"decoded store": store_text(store)}
    decoded = []
    for path in sorted(store.rglob("*.json")):
        try:
            decoded.extend(_strings(json.loads(path.read_bytes())))
        except ValueError:
            decoded.append(path.read_bytes().decode("utf-8", "surrogateescape"))
    texts["decoded JSON documents"] = "\n".join(decoded)
    texts["raw report bytes"] = "\n".join(p.read_bytes().decode("utf-8", "surrogateescape")
                                          for p in sorted((store / "reports").glob("*.json")))
    names = []
    for _top, dirs, files in os.walk(os.fsencode(store)):
        names.extend(os.fsdecode(n) for n in dirs + files)
    texts["file and folder names"] = "\n".join(names)
    return texts


def _leaks(texts: dict[str, str], corpus: BadCorpus) -> list[str]:
    found = []
    for where, text in texts.items():
        for value in corpus.phi:
            if value in text or json.dumps(value)[1:-1] in text:
                found.append(f"{value!r} in {where}")
        for token in corpus.phi_tokens:
            if re.search(rf"(?<![0-9A-Za-z.]){re.escape(token)}(?![0-9A-Za-z])", text):
                found.append(f"{token!r} (as a token) in {where}")
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_no_phi_in_the_store(runs, corpus, kind):
    store, _ = _completed(runs, kind)
    texts = _store_texts(store)
    assert "P-" in texts["decoded store"], "the scan must see decoded pseudonyms"
    leaks = _leaks(texts, corpus)
    assert not leaks, "PHI found:\n" + "\n".join(leaks)


def test_no_phi_in_prefect(runs, corpus):
    from tests.phi_scan import prefect_text

    for kind in KINDS:
        _completed(runs, kind)
    # The manifest path is a flow parameter (config.manifest), which Prefect stores as given, like SOURCE and
    # STORE: documented in docs/prefect-database.md (give neutral names). Everything else must be clean.
    text = prefect_text().replace(corpus.manifest, "<manifest path as given>")
    assert "discovered" in text, "the scan must see the run's logs and artifacts"
    leaks = _leaks({"Prefect logs, artifacts, flow-run parameters and task runs": text}, corpus)
    assert not leaks, "PHI found:\n" + "\n".join(leaks)
