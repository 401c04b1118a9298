"""Series assembly: split_series / frame_acquisitions rules, real DICOM series read per acquisition, pydicom corpus."""

from __future__ import annotations

import math
import sys
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).parent))
import dicom_factory as factory  # noqa: E402
from dicom_corpus import copy_pydicom_corpus  # noqa: E402

from medpipe.readers import (  # noqa: E402
    Acquisition,
    QuarantineReason,
    SliceInfo,
    UnreadableFile,
    frame_acquisitions,
    group_series,
    probe_file,
    read_dicom_file,
    read_dicom_series,
    read_unit,
    split_series,
)

LOCAL = fsspec.filesystem("file")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def info(z: float | None = 0.0, **kw) -> SliceInfo:
    """An axial 64x64 slice at height z (None: no position)."""
    base = dict(rows=64, columns=64, samples_per_pixel=1, frames=1,
                position=None if z is None else (-10.0, -20.0, float(z)), orientation=AXIAL,
                instance_number=None, echo_number=None, echo_time=None, temporal_index=None,
                acquisition_number=None, trigger_time=None, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                pixel_spacing=(0.7, 0.7))
    base.update(kw)
    return SliceInfo(**base)


def split(slices: list[SliceInfo]) -> dict[str, Acquisition]:
    """split_series keyed by name, checking the partition invariant (every index exactly once)."""
    acqs = split_series(slices)
    members = sorted(i for a in acqs for i in a.members)
    assert members == list(range(len(slices)))
    names = [a.name for a in acqs]
    assert len(set(names)) == len(names)
    assert split_series(slices) == acqs  # deterministic
    return {a.name: a for a in acqs}


# ---------------------------------------------------------------- (a) split_series on synthetic facts


def test_single_volume_is_unnamed_and_sorted():
    zs = [6.0, 0.0, 4.0, 2.0]
    acqs = split_series([info(z, instance_number=k) for k, z in enumerate(zs)])
    assert acqs == [Acquisition((1, 3, 2, 0), "", True, ())]


def test_localizer_three_orientations_and_axial_stack():
    scout = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    slices = [
        info(0.0, orientation=AXIAL, image_type=scout, instance_number=1),
        info(0.0, orientation=SAGITTAL, image_type=scout, instance_number=2, position=(0.0, -20.0, 50.0)),
        info(0.0, orientation=CORONAL, image_type=scout, instance_number=3, position=(-10.0, 0.0, 50.0)),
    ] + [info(z, instance_number=4 + k) for k, z in enumerate([10.0, 14.0, 12.0, 16.0, 8.0])]
    got = split(slices)
    assert set(got) == {"original", "localizer"}
    assert got["original"] == Acquisition((7, 3, 5, 4, 6), "original", True, ())
    assert got["localizer"].members == (0, 1, 2) and not got["localizer"].volume
    assert got["localizer"].notes == ("localizer/scout",)


def test_three_orientation_scout_without_image_type_is_three_images():
    slices = [info(0.0, orientation=o, image_type=(), instance_number=k) for k, o in enumerate((AXIAL, SAGITTAL, CORONAL))]
    got = split(slices)
    assert set(got) == {"orient1", "orient2", "orient3"}
    assert all(not a.volume and len(a.members) == 1 for a in got.values())
    assert got["orient2"].members == (1,)


def test_multi_echo_interleaved():
    slices = []
    for k, z in enumerate([0.0, 3.0, 6.0, 9.0]):
        slices.append(info(z, echo_number=2, echo_time=20.0, instance_number=2 * k + 2))
        slices.append(info(z, echo_number=1, echo_time=10.0, instance_number=2 * k + 1))
    got = split(slices)
    assert got == {"echo1": Acquisition((1, 3, 5, 7), "echo1", True, ()),
                   "echo2": Acquisition((0, 2, 4, 6), "echo2", True, ())}
    # echo time alone (no EchoNumbers) splits too
    no_numbers = [replace(s, echo_number=None) for s in slices]
    assert split(no_numbers)["echo1"].members == (1, 3, 5, 7)


def test_multi_phase_ct_by_acquisition_number_and_temporal_index():
    zs = [0.0, 2.5, 5.0]
    slices = [info(z, acquisition_number=a, instance_number=10 * a + k) for a in (2, 1) for k, z in enumerate(zs)]
    got = split(slices)
    assert got["acq1"].members == (3, 4, 5) and got["acq2"].members == (0, 1, 2)
    assert got["acq1"].volume and got["acq2"].volume
    temporal = [replace(s, acquisition_number=1, temporal_index=s.acquisition_number) for s in slices]
    got = split(temporal)
    assert got["phase1"].members == (3, 4, 5) and got["phase2"].members == (0, 1, 2)
    triggered = [replace(s, acquisition_number=None, trigger_time=100.0 * s.acquisition_number) for s in slices]
    assert split(triggered)["phase2"].members == (0, 1, 2)


def test_acquisition_numbers_without_repeated_positions_do_not_split():
    # sequential CT: one AcquisitionNumber per rotation, positions never repeat -> still one volume
    slices = [info(2.0 * k, acquisition_number=k // 2 + 1, instance_number=k) for k in range(6)]
    assert split_series(slices) == [Acquisition(tuple(range(6)), "", True, ())]


def test_repeated_acquisition_same_positions_by_instance_number():
    zs = [0.0, 2.0, 4.0]
    slices = [info(z, instance_number=n) for n, z in zip([4, 5, 6, 1, 2, 3], zs + zs)]
    got = split(slices)
    assert got["rep1"].members == (3, 4, 5) and got["rep2"].members == (0, 1, 2)
    assert got["rep2"].volume and "repeat 2 of 2" in got["rep2"].notes[0]


def test_missing_slice_splits_at_gap():
    zs = [0.0, 2.0, 4.0, 8.0, 10.0, 12.0, 14.0]  # 6.0 missing
    got = split([info(z, instance_number=k) for k, z in enumerate(zs)])
    assert got["part1"].members == (0, 1, 2) and got["part2"].members == (3, 4, 5, 6)
    assert got["part1"].volume and got["part2"].volume
    assert "split at a slice gap (4.0 mm where 2.0 mm is regular)" in got["part2"].notes
    # a run of one slice after splitting becomes a 2D image
    got = split([info(z) for z in [0.0, 2.0, 4.0, 6.0, 10.0]])
    assert got["part1"].members == (0, 1, 2, 3) and got["part2"] == Acquisition(
        (4,), "part2", False, ("split at a slice gap (4.0 mm where 2.0 mm is regular)",))


def test_change_of_spacing_splits_and_rounding_jitter_does_not():
    got = split([info(z) for z in [0.0, 5.0, 10.0, 15.0, 25.0, 35.0, 45.0]])
    assert [got[n].members for n in ("part1", "part2")] == [(0, 1, 2, 3), (4, 5, 6)]
    jitter = [info(round(0.625 * k, 1)) for k in range(12)]  # positions written with one decimal
    assert split_series(jitter) == [Acquisition(tuple(range(12)), "", True, ())]


def test_gantry_tilt_is_one_volume_with_note():
    tilt = math.radians(12.0)
    slices = [info(position=(-10.0, -20.0 + 2.0 * k * math.tan(tilt), 2.0 * k)) for k in (3, 0, 2, 1)]
    acqs = split_series(slices)
    assert acqs == [Acquisition((1, 3, 2, 0), "", True, ("gantry tilt 12.0 deg",))]


def test_lone_scout_and_slices_without_position():
    assert split_series([info(0.0)]) == [Acquisition((0,), "", False, ())]
    got = split_series([info(None, instance_number=3), info(None, instance_number=1)])
    assert got == [Acquisition((1, 0), "", False, ("no slice position",))]
    mixed = split([info(0.0), info(2.0), info(4.0), info(None)])
    assert mixed["main"].members == (0, 1, 2) and mixed["main"].volume
    assert mixed["nopos"] == Acquisition((3,), "nopos", False, ("no slice position",))


def test_multiframe_files_derived_and_sizes():
    slices = [info(0.0), info(2.0), info(0.0, frames=20), info(0.0, image_type=("DERIVED", "SECONDARY")),
              info(2.0, image_type=("DERIVED", "SECONDARY")), info(4.0, rows=32)]
    got = split(slices)
    assert got["file1"] == Acquisition((2,), "file1", False, ("multi-frame file",))
    assert got["derived"].members == (3, 4) and got["derived"].volume
    assert got["original-size1"].members == (0, 1) and got["original-size2"].members == (5,)


def test_image_type_keeps_defined_terms_only():
    from medpipe.readers.acquisitions import clean_image_type

    assert clean_image_type(["original", "PRIMARY", "M", "NORM", "DIS2D", "Dr. Who", "LOCALIZER"]) == (
        "ORIGINAL", "PRIMARY", "LOCALIZER")


# ---------------------------------------------------------------- (b) real series: probe, split, read


def _probe_split(paths: list[str]) -> tuple[list, dict[str, Acquisition]]:
    probes = [probe_file(p, LOCAL) for p in paths]
    groups = group_series(probes)
    assert len(groups) == 1
    probes = next(iter(groups.values()))
    return probes, split([SliceInfo.from_probe(p) for p in probes])


def test_real_multi_echo_series(tmp_path):
    rng = np.random.default_rng(5)
    uid = generate_uid()
    data = rng.integers(0, 3000, size=(2, 4, 6, 5), dtype=np.uint16)  # (echo, z, y, x)
    paths, instance = [], 0
    for z in rng.permutation(4):
        for e in (1, 0):
            instance += 1
            ds = factory.mr_slice(data[e, z], (1.0, 2.0, 3.0 * z), series_uid=uid, instance=instance,
                                  EchoNumbers=e + 1, EchoTime=10.0 * (e + 1), ImageType=["ORIGINAL", "PRIMARY", "M"])
            paths.append(factory.save(ds, tmp_path / f"f{instance:02d}.dcm"))
    probes, got = _probe_split(paths)
    assert probes[0].echo_number in (1, 2) and probes[0].image_type == ("ORIGINAL", "PRIMARY")
    assert set(got) == {"echo1", "echo2"}
    for e, name in enumerate(("echo1", "echo2")):
        image = read_dicom_series([probes[i].path for i in got[name].members], LOCAL)
        assert image.pixels.shape == (1, 4, 6, 5)
        np.testing.assert_array_equal(image.pixels[0], data[e])
        assert image.spacing == pytest.approx((3.0, 0.9, 0.8)) and image.notes == ()
    with pytest.raises(UnreadableFile, match="share a position"):  # the whole series is not one volume
        read_dicom_series([p.path for p in probes], LOCAL)


def test_real_localizer_in_ct_series(tmp_path):
    uid = generate_uid()
    hu = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8) - 100
    paths = [factory.save(factory.ct_slice(hu[k], 2.5 * k, series_uid=uid, instance=k + 2), tmp_path / f"s{k}.dcm")
             for k in (2, 0, 3, 1)]
    scout = factory.ct_slice(np.zeros((8, 8)), 0.0, series_uid=uid, instance=1, orientation=CORONAL,
                             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    paths.append(factory.save(scout, tmp_path / "scout.dcm"))
    probes, got = _probe_split(paths)
    assert set(got) == {"original", "localizer"} and not got["localizer"].volume
    volume = read_dicom_series([probes[i].path for i in got["original"].members], LOCAL)
    np.testing.assert_allclose(volume.pixels[0], hu)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.6))
    (index,) = got["localizer"].members
    assert read_dicom_file(probes[index].path, LOCAL).pixels.shape == (1, 8, 8)


def test_real_gap_split_and_reader_refuses_irregular_stack(tmp_path):
    uid = generate_uid()
    hu = np.arange(7 * 4 * 4, dtype=np.float32).reshape(7, 4, 4)
    keep = [0, 1, 2, 4, 5, 6]  # slice 3 missing
    paths = [factory.save(factory.ct_slice(hu[k], 2.0 * k, series_uid=uid, instance=k + 1), tmp_path / f"{k}.dcm")
             for k in keep[::-1]]
    with pytest.raises(UnreadableFile, match="non-uniform slice spacing") as info_:
        read_dicom_series(paths, LOCAL)
    assert info_.value.reason == QuarantineReason.decode_error
    probes, got = _probe_split(paths)
    assert set(got) == {"part1", "part2"}
    for name, ks in (("part1", [0, 1, 2]), ("part2", [4, 5, 6])):
        image = read_dicom_series([probes[i].path for i in got[name].members], LOCAL)
        np.testing.assert_allclose(image.pixels[0], hu[ks])
        assert image.spacing[0] == pytest.approx(2.0)
        np.testing.assert_allclose(image.affine[:3, 3], [-50.0, -60.0, 2.0 * ks[0]])


def test_real_gantry_tilt_affine(tmp_path):
    uid = generate_uid()
    tilt = math.radians(15.0)
    hu = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    paths = []
    for k in (1, 3, 0, 2):
        ds = factory.ct_slice(hu[k], 0.0, series_uid=uid, instance=k + 1,
                              origin=(0.0, 3.0 * k * math.tan(tilt), 3.0 * k))
        paths.append(factory.save(ds, tmp_path / f"{k}.dcm"))
    probes, got = _probe_split(paths)
    assert got[""].notes == ("gantry tilt 15.0 deg",)
    image = read_dicom_series(paths, LOCAL)
    np.testing.assert_allclose(image.pixels[0], hu)
    assert image.spacing[0] == pytest.approx(3.0)  # along the normal, not the step length
    np.testing.assert_allclose(image.affine[:3, 2], [0.0, 3.0 * math.tan(tilt), 3.0], atol=1e-6)
    assert image.notes == ("gantry tilt 15.0 deg",)


# ---------------------------------------------------------------- (c) enhanced multi-frame with two stacks


def _two_stack_file(tmp_path, rng) -> tuple[str, np.ndarray, list[int], list[int]]:
    frames = rng.integers(0, 1000, size=(6, 5, 5), dtype=np.uint16)
    # stored order interleaves stacks; within a stack positions are shuffled
    axial_z = {0: 4.0, 2: 0.0, 4: 2.0}
    sag_x = {1: 10.0, 3: 6.0, 5: 8.0}
    positions = [(0.0, 0.0, axial_z[k]) if k in axial_z else (sag_x[k], 0.0, 0.0) for k in range(6)]
    orientations = [AXIAL if k in axial_z else SAGITTAL for k in range(6)]
    ds = factory.enhanced_mr(frames, positions, orientations, stack_ids=["1" if k in axial_z else "2" for k in range(6)])
    path = factory.save(ds, tmp_path / "enh.dcm")
    axial_order = [2, 4, 0]  # ascending z (axial normal +z)
    sag_order = [1, 5, 3]  # sagittal normal (0,1,0) x (0,0,-1) = (-1,0,0): descending x
    return path, frames, axial_order, sag_order


def test_enhanced_two_stacks(tmp_path):
    rng = np.random.default_rng(9)
    path, frames, axial_order, sag_order = _two_stack_file(tmp_path, rng)
    probe = probe_file(path, LOCAL)
    assert probe.frames == 6
    groups = probe.frame_groups
    assert [(g.name, g.volume) for g in groups] == [("stack1", True), ("stack2", True)]
    assert list(groups[0].members) == axial_order and list(groups[1].members) == sag_order
    axial = read_dicom_file(path, LOCAL, frames=groups[0].members[::-1])  # any order: sorted along the normal
    np.testing.assert_array_equal(axial.pixels[0], frames[axial_order])
    assert axial.spacing == pytest.approx((2.0, 0.9, 0.8)) and axial.orientation == "LPS"
    sag = read_unit("dicom-file", [path], LOCAL, frames=groups[1].members)
    np.testing.assert_array_equal(sag.pixels[0], frames[sag_order])
    assert sag.spacing[0] == pytest.approx(2.0)
    one = read_dicom_file(path, LOCAL, frames=[3])
    assert one.pixels.shape == (1, 5, 5) and one.spacing == (0.9, 0.8)
    with pytest.raises(UnreadableFile, match="2 acquisitions"):
        read_dicom_file(path, LOCAL)
    with pytest.raises(UnreadableFile, match="frame selection"):
        read_dicom_file(path, LOCAL, frames=[6])


def test_enhanced_echoes_without_stack_ids_and_single_stack(tmp_path):
    import pydicom

    frames = np.arange(4 * 3 * 3, dtype=np.uint16).reshape(4, 3, 3)
    positions = [(0.0, 0.0, z) for z in (0.0, 0.0, 1.5, 1.5)]
    ds = factory.enhanced_mr(frames, positions, [AXIAL] * 4, echo_times=[5.0, 12.0, 5.0, 12.0])
    groups = frame_acquisitions(ds)
    assert [(g.name, g.members) for g in groups] == [("echo1", (0, 2)), ("echo2", (1, 3))]
    single = factory.enhanced_mr(frames, [(0.0, 0.0, 1.5 * k) for k in (3, 1, 2, 0)], [AXIAL] * 4)
    assert frame_acquisitions(single) == [Acquisition((3, 1, 2, 0), "", True, ())]
    path = factory.save(single, tmp_path / "one.dcm")
    assert probe_file(path, LOCAL).frame_groups == ()
    np.testing.assert_array_equal(read_dicom_file(path, LOCAL).pixels[0], frames[[3, 1, 2, 0]])
    assert pydicom.dcmread(path).NumberOfFrames == 4


# ---------------------------------------------------------------- (d) pydicom's corpus, end to end


def test_pydicom_corpus_every_decodable_instance_is_read(tmp_path):
    oracle = copy_pydicom_corpus(tmp_path)
    assert oracle["files"] >= 100 and len(oracle["decodable"]) >= 50
    probes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in oracle["names"]:
            try:
                probes.append(probe_file(str(tmp_path / name), LOCAL))
            except UnreadableFile:
                pass  # rejected files are checked against the oracle below (nothing decodable may be lost)
        series = list(group_series(probes).values()) + [[p] for p in probes if not p.series_instance_uid]
        covered: set[str] = set()
        failures: list[str] = []
        counts: dict[str, int] = defaultdict(int)
        for members in series:
            for acq in split_series([SliceInfo.from_probe(p) for p in members]):
                chosen = [members[i] for i in acq.members]
                if acq.volume:
                    try:
                        image = read_dicom_series([p.path for p in chosen], LOCAL)
                        assert image.pixels.shape[1] == len(chosen)
                        covered.update(p.sop_instance_uid for p in chosen)
                        counts["volume"] += 1
                    except UnreadableFile as exc:
                        failures.append(f"volume {acq.name!r} of {len(chosen)}: {exc}")
                    continue
                for p in chosen:
                    ok = True
                    for group in p.frame_groups or (None,):
                        try:
                            read_dicom_file(p.path, LOCAL, None if group is None else group.members)
                            counts["frame group" if group else "file"] += 1
                        except UnreadableFile as exc:
                            ok = False
                            failures.append(f"{Path(p.path).name} {acq.name!r}: {exc}")
                    if ok:
                        covered.add(p.sop_instance_uid)
    print(f"\ncorpus: {oracle['files']} files, {len(oracle['decodable'])} decodable instances, reads {dict(counts)}")
    print("\n".join(["medpipe failures:"] + failures))
    missing = oracle["decodable"] - covered
    assert not missing, f"{len(missing)} decodable instance(s) not read: see failures above"
