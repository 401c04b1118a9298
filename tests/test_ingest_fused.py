"""One decode per file: the archive and the training samples are made by the same task from the same decoded
arrays, and the result equals the samples made from the archive after planning (the path 3D stores without
header geometry take). Both paths run serially here on the demo data plus every defective file kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.deid import resolve_key
from medpipe.ingest import archive as archive_module
from medpipe import store as store_module
from medpipe.ingest import pipeline
from medpipe.ingest.finalize import verify_store
from medpipe.ingest.pipeline import PackingConfigError
from medpipe.ingest.records import ArchiveRecord
from medpipe.ingest.volume_cases import case_geometry
from medpipe.store import (attrs_of, get_array, get_group, open_store, read_archive_image, read_json,
                           read_sample_table)
from medpipe.volumes import open_case, to_stored

CONFIGS = {
    "2d": IngestConfig(files_per_shard=16),
    "3d-volumes": IngestConfig(files_per_shard=16, preprocess=PreprocessConfig(kind="3d", shape=(16, 32, 32))),
    "3d-fixed": IngestConfig(files_per_shard=16, preprocess=PreprocessConfig(kind="3d", shape=(16, 32, 32),
                                                                             layout="fixed")),
}


def _ingest(source: str, store: str, config: IngestConfig) -> dict:
    return pipeline.ingest_in_process(source, store, config, resolve_key())


def _from_archive(run, plan, scans):  # the samples-after-archiving path, for every kind
    open_store(run.store, mode="a").require_group("archive")
    return None


def _arrays(store: str) -> dict[str, np.ndarray]:
    root = open_store(store)
    out = {name: np.asarray(get_array(root, f"training/{name}")[...])
           for name in get_group(root, "training").array_keys()}
    if "volumes" in get_group(root, "training"):
        for case in get_group(root, "training/volumes").group_keys():
            opened = open_case(root, int(case))  # images read as training reads them (normalised)
            out[f"{case}/image"] = np.asarray(opened.image[...])
            out[f"{case}/mask"] = np.asarray(opened.mask[...])
    return out


@pytest.fixture(scope="module")
def ct_source(demo_source, tmp_path_factory):
    """The demo's CT series and masks only: every case has header geometry (the full demo also holds a legacy
    multi-frame XA whose geometry only decoding tells, which sends 3D stores down the archive-based path)."""
    root = tmp_path_factory.mktemp("ct") / "data"
    for folder in ("ct", "masks"):
        shutil.copytree(demo_source[0] / folder, root / folder)
    lines = (demo_source[0] / "labels.csv").read_text().splitlines()
    keep = [line for line in lines[1:] if line.startswith("ct/")]
    (root / "labels.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    return root


def test_3d_with_a_case_without_header_geometry_takes_the_archive_path(demo_source, deid_key, tmp_path, monkeypatch):
    taken = []
    plan_samples = pipeline.plan_samples
    monkeypatch.setattr(pipeline, "plan_samples", lambda *a: taken.append(plan_samples(*a)) or taken[-1])
    summary = _ingest(str(demo_source[0]), str(tmp_path / "s.zarr"), CONFIGS["3d-volumes"])
    assert taken == [None] and summary["samples"] > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_samples_equal_samples_from_the_archive(name, demo_source, ct_source, deid_key, tmp_path,
                                                      monkeypatch):
    source = str(demo_source[0] if name == "2d" else ct_source)
    config = CONFIGS[name]
    calls = {"read_unit": 0, "read_archive_image": 0, "read_sample_table": 0}
    read_unit, read_back, read_table = (archive_module.read_unit, archive_module.read_archive_image,
                                        store_module.read_sample_table)

    def counting_read_unit(*args, **kwargs):
        calls["read_unit"] += 1
        return read_unit(*args, **kwargs)

    def counting_read_back(*args, **kwargs):
        calls["read_archive_image"] += 1
        return read_back(*args, **kwargs)

    def counting_read_table(*args, **kwargs):
        calls["read_sample_table"] += 1
        return read_table(*args, **kwargs)

    monkeypatch.setattr(archive_module, "read_unit", counting_read_unit)
    monkeypatch.setattr(store_module, "read_sample_table", counting_read_table)
    monkeypatch.setattr(archive_module, "read_archive_image", counting_read_back)
    fused = _ingest(source, str(tmp_path / "fused.zarr"), config)
    units = len(read_json(str(tmp_path / "fused.zarr"), "reports/units.json"))
    # each unit decoded once (units that fail to decode are quarantined and not in units.json), never read back
    assert units <= calls["read_unit"] <= units + fused["counts"]["quarantined"]
    assert calls["read_archive_image"] == 0
    assert calls["read_sample_table"] == 0  # the content hash takes the table it was written from, from memory
    assert fused["samples"] > 0
    # the content hash was made from the digests the tasks reported; recomputed from the data it agrees
    assert verify_store(str(tmp_path / "fused.zarr")) == []
    if name == "3d-volumes":  # CT cases keep HU on disk; reading normalises them with the store's statistics
        root = open_store(str(tmp_path / "fused.zarr"))
        case = get_group(root, "training/volumes/0")
        assert attrs_of(case)["raw_intensities"] == "CT"
        assert get_array(case, "image").dtype == np.int16  # whole HU, not resampled here
        assert float(np.asarray(get_array(case, "image")[...]).min()) == -500  # air, floored at the CT foreground

    monkeypatch.setattr(pipeline, "plan_samples", _from_archive)
    reference = _ingest(source, str(tmp_path / "reference.zarr"), config)
    for field in ("counts", "sample_shape", "training_spacing", "masks_checked", "masks_flagged", "excluded",
                  "quarantine_reasons", "layout"):
        assert fused[field] == reference[field], field
    assert fused["plan"] == reference["plan"]
    a, b = read_sample_table(str(tmp_path / "fused.zarr")), read_sample_table(str(tmp_path / "reference.zarr"))
    # rows were planned before decoding: a unit that then failed to decode keeps an empty row with split -1 (so
    # the seeded order differs too: rows are matched by unit)
    dead = np.isin(a["unit"], b["unit"], invert=True)
    assert (a["split"][dead] == -1).all() and fused["samples"] == reference["samples"] + int(dead.sum())
    row_of = {u: i for i, u in enumerate(b["unit"])}
    live = [int(i) for i in np.flatnonzero(~dead)]
    match = np.array([row_of[a["unit"][i]] for i in live], dtype=np.int64)
    assert sorted(a) == sorted(b) and sorted(match.tolist()) == list(range(len(b["unit"])))
    for column in a:
        assert np.array_equal(a[column][live], b[column][match]), column
    arrays, expected = _arrays(str(tmp_path / "fused.zarr")), _arrays(str(tmp_path / "reference.zarr"))
    rows = {k: v[live] for k, v in arrays.items() if "/" not in k}
    expected_rows = {k: v[match] for k, v in expected.items() if "/" not in k}
    reference_case = {f: int(r) for f, r in zip(live, match)}
    cases = {f"{reference_case[int(k.split('/')[0])]}/{k.split('/')[1]}": v for k, v in arrays.items() if "/" in k}
    arrays, expected = {**rows, **cases}, {**expected_rows, **{k: v for k, v in expected.items() if "/" in k}}
    assert sorted(arrays) == sorted(expected)
    for key, values in arrays.items():
        # CT is normalised after resampling on the fused path (the dataset statistics come after decoding):
        # equal up to float rounding where no resampling happens, as here
        np.testing.assert_allclose(values, expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for report in ("excluded.json", "mask_check.json", "quarantine.json"):
        assert read_json(str(tmp_path / "fused.zarr"), f"reports/{report}") == \
            read_json(str(tmp_path / "reference.zarr"), f"reports/{report}"), report


def test_float16_training_arrays(demo_source, ct_source, deid_key, tmp_path):
    """training_dtype float16 halves the training bytes; the values are the float32 ones rounded to float16."""
    for name, source in (("2d", demo_source[0]), ("3d-volumes", ct_source)):
        config = CONFIGS[name]
        half = config.model_copy(update={"store": config.store.model_copy(update={"training_dtype": "float16"})})
        _ingest(str(source), str(tmp_path / f"{name}-32.zarr"), config)
        _ingest(str(source), str(tmp_path / f"{name}-16.zarr"), half)
        assert verify_store(str(tmp_path / f"{name}-16.zarr")) == []
        stored = get_array(open_store(str(tmp_path / f"{name}-16.zarr")),
                           "training/images" if name == "2d" else "training/volumes/0/image")
        # CT cases not resampled keep their HU exactly as int16 (normalised as read), whatever the training dtype
        assert stored.dtype == (np.float16 if name == "2d" else np.int16)
        full, small = _arrays(str(tmp_path / f"{name}-32.zarr")), _arrays(str(tmp_path / f"{name}-16.zarr"))
        assert sorted(full) == sorted(small)
        for key, values in full.items():
            if values.dtype == np.float32:  # CT volumes: HU in float16 (0.5 HU steps near 1000 HU), normalised
                np.testing.assert_allclose(small[key].astype(np.float32), values, rtol=1e-3, atol=3e-3, err_msg=key)
            else:
                assert np.array_equal(small[key], values), key


def test_jpegls_volumes_hold_the_same_hu(ct_source, deid_key, tmp_path):
    """store.volume_codec jpegls: CT cases (int16 HU) stored losslessly in JPEG-LS, read back equal by zarr and by
    ChunkReader; masks stay Blosc. (Which is smaller depends on the data: benchmarks/ingest.py measures real CT.)"""
    from medpipe.training.chunk_reader import ChunkReader

    config = CONFIGS["3d-volumes"]
    jpegls = config.model_copy(update={"store": config.store.model_copy(update={"volume_codec": "jpegls"})})
    blosc_url, jpegls_url = str(tmp_path / "blosc.zarr"), str(tmp_path / "jpegls.zarr")
    _ingest(str(ct_source), blosc_url, config)
    _ingest(str(ct_source), jpegls_url, jpegls)
    assert verify_store(jpegls_url) == []
    root = open_store(jpegls_url)
    cases = sorted(get_group(root, "training/volumes").group_keys())
    assert cases
    for case in cases:
        image = get_array(root, f"training/volumes/{case}/image")
        assert image.dtype == np.int16 and "medpipe.jpegls" in json.dumps(image.metadata.to_dict())
        assert "medpipe.jpegls" not in json.dumps(get_array(root, f"training/volumes/{case}/mask").metadata.to_dict())
        reference = np.asarray(get_array(open_store(blosc_url), f"training/volumes/{case}/image")[...])
        assert np.array_equal(np.asarray(image[...]), reference)
        reader = ChunkReader(image)
        assert reader.decodable and reader.layout.compressor == "jpegls"
        first = reader.decode(reader.fetch_chunks([(0, 0, 0, 0)])[0])
        np.testing.assert_array_equal(first, reference[tuple(slice(0, n) for n in reader.layout.chunk_shape)])
    full, small = _arrays(blosc_url), _arrays(jpegls_url)
    assert sorted(full) == sorted(small) and all(np.array_equal(full[k], small[k]) for k in full)


def test_uint8_training_rows_are_the_float32_rows_on_a_grid_of_1_255(demo_source, deid_key, tmp_path):
    """training_dtype uint8: each value is the float32 row's nearest multiple of 1/255, read back as float32 by
    plain zarr; the images take under half the float32 bytes; masks, labels and table are unchanged."""
    config = CONFIGS["2d"]
    packed = config.model_copy(update={"store": config.store.model_copy(update={"training_dtype": "uint8"})})
    full_url, packed_url = str(tmp_path / "f32.zarr"), str(tmp_path / "u8.zarr")
    _ingest(str(demo_source[0]), full_url, config)
    _ingest(str(demo_source[0]), packed_url, packed)
    assert verify_store(packed_url) == []
    stored = get_array(open_store(packed_url), "training/images")
    assert stored.dtype == np.float32 and "numcodecs.fixedscaleoffset" in json.dumps(stored.metadata.to_dict())
    full, small = _arrays(full_url), _arrays(packed_url)
    assert sorted(full) == sorted(small) and np.array_equal(full["labels"], small["labels"])
    assert np.array_equal(full.get("masks"), small.get("masks"))
    steps = small["images"].astype(np.float64) * 255
    assert np.abs(steps - np.rint(steps)).max() < 1e-3  # on the grid
    assert np.abs(small["images"] - full["images"]).max() <= 0.5 / 255 + 1e-6  # its nearest point
    assert _bytes(packed_url, "training/images") < 0.5 * _bytes(full_url, "training/images")


def test_uint8_training_rows_refuse_z_scored_images_before_writing(deid_key, tmp_path):
    """A CT slice in a 2D uint8 store would be z-scored, outside 0..1: one-line error, nothing archived."""
    from pydicom.data import get_testdata_file

    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "ct.dcm")
    config = CONFIGS["2d"].model_copy(update={"store": StoreConfig(training_dtype="uint8")})
    with pytest.raises(PackingConfigError, match="1 CT image.* use float16") as raised:
        _ingest(str(source), str(tmp_path / "s.zarr"), config)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "s.zarr" / "archive").exists()


def _bytes(url: str, path: str) -> int:
    return sum(f.stat().st_size for f in Path(url, path).rglob("*") if f.is_file())


def test_resampled_ct_cases_keep_whole_hu(ct_source, deid_key, tmp_path):
    """A CT case resampled to another spacing is stored as int16 HU: the float resampling of the decoded HU
    rounded to the nearest unit (at most 0.5 HU away), not float32; below the CT foreground, -500 HU."""
    base = CONFIGS["3d-volumes"]
    spacing = (3.0, 1.7, 1.7)
    config = base.model_copy(update={"preprocess": base.preprocess.model_copy(update={"target_spacing": spacing})})
    _ingest(str(ct_source), str(tmp_path / "fused.zarr"), config)
    assert verify_store(str(tmp_path / "fused.zarr")) == []
    root = open_store(str(tmp_path / "fused.zarr"))
    cases = sorted(get_group(root, "training/volumes").group_keys())
    assert cases
    for index in cases:
        case = get_group(root, f"training/volumes/{index}")
        attrs = attrs_of(case)
        assert attrs["raw_intensities"] == "CT"  # resampled: spacing near the target (whole voxels over the extent)
        np.testing.assert_allclose(attrs["geometry"]["spacing"], spacing, rtol=0.1)
        stored = np.asarray(get_array(case, "image")[...])
        assert stored.dtype == np.int16
        pixels, _, unit = read_archive_image(root, attrs["unit"])  # the decoded HU, as archived
        resampled = to_stored(pixels.astype(np.float32), case_geometry(ArchiveRecord.from_attrs(unit), spacing),
                              "linear")
        assert resampled.shape == stored.shape and float(np.abs(resampled).max()) > 500
        assert float(np.abs(stored - np.maximum(resampled, -500)).max()) <= 0.5 + 1e-3
