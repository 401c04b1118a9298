"""Real DICOM from other tools: pydicom's own test corpus (and pydicom-data's) through the ingest flow.

The oracle is plain pydicom: every distinct SOPInstanceUID whose pixels pydicom decodes must be ingested (at least
one of its files in the archive, not quarantined), and every file must be accounted for.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import pydicom
import pytest

from medpipe.config import IngestConfig, PreprocessConfig
from medpipe.deid import DeidKey, Pseudonymizer
from medpipe.store import read_json, store_attrs
from tests.conftest import TEST_KEY
from tests.dicom_corpus import copy_pydicom_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(prefect_api, tmp_path_factory):
    import os

    from flows.ingest import run_ingest

    os.environ["MEDPIPE_DEID_KEY"] = TEST_KEY
    source = tmp_path_factory.mktemp("corpus") / "dicom"
    oracle = copy_pydicom_corpus(source)
    store = source.parent / "corpus.zarr"
    result = run_ingest(str(source), str(store), IngestConfig(preprocess=PreprocessConfig(kind="2d", shape=(32, 32)),
                                                              files_per_shard=32))
    return source, store, oracle, result


def test_every_decodable_distinct_instance_is_ingested(corpus):
    source, store, oracle, result = corpus
    counts = result["counts"]
    assert counts["discovered"] == oracle["files"] == counts["ingested"] + counts["quarantined"]
    assert len(oracle["decodable"]) >= 60  # pydicom alone: 66 distinct instances; with pydicom-data: 89
    pseudonyms = Pseudonymizer(DeidKey(TEST_KEY.encode()))
    quarantined = {q["source_hash"]: q["reason"] for q in read_json(str(store), "reports/quarantine.json")}
    files_of: dict[str, list[str]] = defaultdict(list)
    for name in oracle["decodable_files"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source / name, stop_before_pixels=True)
        uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
        files_of[str(uid)].append(name)
    missing = {uid: [quarantined.get(pseudonyms.path(n)) for n in names] for uid, names in files_of.items()
               if all(pseudonyms.path(n) in quarantined for n in names)}
    assert not missing, f"decodable instances not ingested (their quarantine reasons): {missing}"
    assert "not_ingested" not in result["quarantine_reasons"]


def test_corpus_rules_are_visible_in_the_store(corpus):
    _, store, _, result = corpus
    attrs = store_attrs(str(store))
    assembly = attrs["assembly"]
    assert assembly["volumes"] >= 1 and assembly["images_2d"] > assembly["volumes"]
    assert sum(assembly["patient_sources"].values()) == attrs["archive_images"]
    units = read_json(str(store), "reports/units.json")
    assert len(units) == attrs["archive_images"] and all("acquisition" in u and "notes" in u for u in units)
    # volumes do not fit a 2D dataset: they stay in the archive and are listed as excluded, with the reason
    excluded = read_json(str(store), "reports/excluded.json")
    assert len(excluded) == result["counts"]["excluded_from_training"] >= assembly["volumes"]
