from types import SimpleNamespace

import numpy as np
import pytest

from medpipe.config import IngestConfig, PreprocessConfig, SplitConfig, load_config
from medpipe.manifest import check_references, parse_manifest
from medpipe.fingerprint import compute_fingerprint, intensity_sample
from medpipe.preprocess import NotTrainable, convert_channels, floor_below_ct_foreground, normalize, to_training_sample
from medpipe.splits import patient_labels, split_patients, split_warnings


def test_splits_follow_fractions_and_are_stable_when_patients_come_and_go():
    cfg = SplitConfig(train=0.6, val=0.2, test=0.2, seed=3)
    patients = [f"P-{i:012x}" for i in range(2000)]
    full = split_patients(patients, cfg)
    assert full == split_patients(list(reversed(patients)), cfg)  # order does not matter
    counts = np.bincount(list(full.values()), minlength=3) / len(patients)
    assert np.allclose(counts, [0.6, 0.2, 0.2], atol=0.04)  # binomial sd ~0.01 at n=2000
    # remove a third of the patients and add new ones: nobody who stays moves
    kept = patients[::3] + [f"P-new-{i}" for i in range(300)]
    partial = split_patients(kept, cfg)
    assert all(partial[p] == full[p] for p in patients[::3])
    # another seed reshuffles
    other = split_patients(patients, SplitConfig(train=0.6, val=0.2, test=0.2, seed=4))
    assert sum(other[p] != full[p] for p in patients) > 500


def test_split_warnings_name_empty_splits_and_missing_classes():
    cfg = SplitConfig(train=0.7, val=0.15, test=0.15)
    patients = [f"P-{i}" for i in range(400)]
    assign = split_patients(patients, cfg)
    strata = {p: i % 2 for i, p in enumerate(patients)}
    assert split_warnings(assign, strata, cfg, ["none", "lesion"]) == []
    only_train = {p: 0 for p in patients[:3]}
    warnings = split_warnings(only_train, {p: 0 for p in only_train}, cfg, ["none", "lesion"])
    assert any("val split is empty" in w and "without validation" in w for w in warnings)
    assert any("test split is empty" in w for w in warnings)
    missing = split_warnings({"a": 0, "b": 0, "c": 1}, {"a": 0, "b": 1, "c": 0}, cfg, ["none", "lesion"])
    assert "the val split has no patient of class lesion" in missing
    assert patient_labels(["a", "a", "b"], [1, 1, -1]) == {"a": 1, "b": -1}


def test_split_config_validates():
    with pytest.raises(ValueError):
        SplitConfig(train=0.5, val=0.1, test=0.1)


def test_preprocess_2d_and_3d_shapes_and_ranges():
    img = np.random.default_rng(0).integers(0, 4096, (1, 100, 120)).astype(np.uint16)
    x, m = to_training_sample(img, (0.5, 0.5), "DX", PreprocessConfig(shape=(64, 64)))
    assert x.shape == (1, 64, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and m is None
    vol = np.full((1, 20, 40, 40), -1000, np.float32)
    vol[:, 5:15, 10:30, 10:30] = 40
    mask = (vol > 0).astype(np.uint8)
    norm = {"p00_5": -100.0, "p99_5": 200.0, "mean": 40.0, "std": 10.0}
    x, m = to_training_sample(vol, (5.0, 1.0, 1.0), "CT", PreprocessConfig(kind="3d", shape=(32, 32, 32)),
                              mask=mask, norm=norm, target_spacing=(2.5, 1.0, 1.0))
    assert x.shape == (1, 32, 32, 32) and m.shape == (1, 32, 32, 32)
    assert set(np.unique(m)) <= {0, 1} and m.sum() > 0
    assert abs(float(x[m.astype(bool)].mean())) < 1.0  # tissue at the fingerprint mean is ~0 after z-score
    with pytest.raises(NotTrainable):
        to_training_sample(vol, (1, 1, 1), "CT", PreprocessConfig(kind="2d"))
    with pytest.raises(NotTrainable):
        to_training_sample(img, (1, 1), "DX", PreprocessConfig(kind="3d", shape=(8, 8, 8)))


def test_channel_conversion_and_normalisation():
    rgb = np.stack([np.full((4, 4), v, np.uint8) for v in (255, 0, 0)])
    assert convert_channels(rgb, 1).shape == (1, 4, 4)
    assert convert_channels(rgb[:1], 3).shape == (3, 4, 4)
    mr = np.random.default_rng(1).normal(100, 20, (1, 8, 8, 8))
    z = normalize(mr, "MR", None)
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_the_ct_floor_changes_no_normalised_value_whatever_the_datasets_foreground(dtype):
    rng = np.random.default_rng(5)
    for trial in range(20):  # CT of varied make-up: air, fat, soft tissue, bone, lung-heavy or bone-heavy
        centres = rng.choice([-1000, -850, -510, -499, -100, 40, 700, 1500], size=3)
        hu = np.concatenate([rng.normal(c, rng.uniform(1, 60), 4000) for c in centres]).astype(dtype)
        sample = intensity_sample(hu, "CT", seed=trial)  # as the ingest draws it
        if not sample:
            continue
        record = SimpleNamespace(modality="CT", spacing=(1.0, 1.0, 1.0), shape=(1, 4, 100, 30), is_volume=True,
                                 intensity_sample=sample)  # what compute_fingerprint reads of an archive record
        norm = compute_fingerprint([record])["modalities"]["CT"]["intensity"]
        floored = floor_below_ct_foreground(hu.copy())
        assert floored.dtype == hu.dtype and floored.min() >= -500
        np.testing.assert_array_equal(normalize(floored, "CT", norm), normalize(hu, "CT", norm))
    given = np.array([-1000, 0], np.int16)
    assert floor_below_ct_foreground(given).tolist() == [-500, 0] and given.tolist() == [-1000, 0]  # a new array
    assert floor_below_ct_foreground(given, in_place=True) is given and given.tolist() == [-500, 0]


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preprocess:\n  kind: 3d\n  shape: [16, 32, 32]\nsplit:\n  seed: 5\n")
    cfg = load_config(path, IngestConfig, **{"workers": 3, "preprocess.channels": None})
    assert cfg.preprocess.shape == (16, 32, 32) and cfg.split.seed == 5 and cfg.workers == 3
    assert cfg.to_dict()["preprocess"]["kind"] == "3d"
    with pytest.raises(ValueError):
        load_config(None, IngestConfig, **{"preprocess.shape": [64]})


def test_manifest_reports_missing_files_and_undeclared_classes():
    text = "path,label,mask,patient_id\na/1.png,none,,P1\na/2.png,tumour,,P1\nmissing.png,lesion,,\nct/s1,lesion,m.nii.gz,\n"
    manifest = parse_manifest(text, ["none", "lesion"], hash_path=lambda p: f"h({len(p)})")
    check_references(manifest, {"a/1.png", "a/2.png", "ct/s1/x.dcm"}, hash_path=lambda p: f"h({len(p)})")
    problems = sorted(i["problem"] for i in manifest.issues)
    assert problems == ["file or folder not found", "label is not a declared class", "mask file not found"]
    assert all("missing" not in str(i) for i in manifest.issues)  # issues hold hashes, not paths
    assert manifest.class_index("lesion") == 1 and manifest.class_index("tumour") == -1
