"""The synthetic/ group: same shape and dtype as training/, provenance, refuses other data, leaves real data alone."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.gan.synthetic import (Provenance, SyntheticSetError, check_synthetic_current, read_synthetic,
                                   synthetic_provenance, write_synthetic)
from medpipe.store import content_hash, open_store, store_attrs
from training_store import make_2d_store


@pytest.fixture()
def store(tmp_path):
    return make_2d_store(str(tmp_path / "s.zarr"), n=32, size=16)


def _provenance(store: str, **changes) -> Provenance:
    attrs = store_attrs(store)
    data = dict(generator_sha256="ab" * 32, generator_epoch=3, trained_on_content_hash=attrs["content_hash"], seed=7,
                n_per_class=4, classes=list(attrs["classes"]), sample_shape=list(attrs["sample_shape"]))
    return Provenance(**{**data, **changes})


def test_write_and_read_back_with_provenance(store):
    root_hash = content_hash(open_store(store))
    images = np.random.default_rng(0).random((8, 1, 16, 16)).astype(np.float32)
    labels = np.repeat([0, 1], 4)
    assert synthetic_provenance(store) is None
    write_synthetic(store, images, labels, np.full(8, 7), _provenance(store))
    got, got_labels, provenance = read_synthetic(store)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert provenance["generator_sha256"] == "ab" * 32 and provenance["seed"] == 7 and provenance["created_at"]
    assert content_hash(open_store(store)) == root_hash  # the real data and its hash are untouched


def test_refuses_other_shapes_and_other_data(store):
    images = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(SyntheticSetError, match="shape"):
        write_synthetic(store, images, np.zeros(2), np.zeros(2), _provenance(store))
    ok = np.zeros((2, 1, 16, 16), np.float32)
    with pytest.raises(SyntheticSetError, match="other data"):
        write_synthetic(store, ok, np.zeros(2), np.zeros(2), _provenance(store, trained_on_content_hash="0" * 64))
    with pytest.raises(SyntheticSetError, match="no synthetic"):
        check_synthetic_current(store)
    write_synthetic(store, ok, np.zeros(2), np.zeros(2), _provenance(store))
    root = open_store(store, mode="a")
    root.attrs["medpipe"] = {**store_attrs(store), "content_hash": "f" * 64}  # the store was re-ingested
    with pytest.raises(SyntheticSetError, match="other data"):
        read_synthetic(store)


def test_training_mixes_synthetic_samples_into_train_only(store, tmp_path):
    from medpipe.training.config import TrainConfig
    from medpipe.training.data import ZarrImageDataset
    from medpipe.training.engine import synthetic_extra, train
    from medpipe.training.checkpoints import load_checkpoint
    from medpipe.errors import UserError

    n_real = len(ZarrImageDataset(store, "train"))
    images = np.full((10, 1, 16, 16), 7.0, np.float32)  # a value no real sample has (they lie in 0..1)
    write_synthetic(store, images, np.repeat([0, 1], 5), np.zeros(10), _provenance(store, n_per_class=5))
    config = TrainConfig(task="classify", synthetic_ratio=0.25, epochs=1, batch_size=8, device="cpu", seed=1)
    extra, lineage = synthetic_extra(store, config, n_real)
    assert len(extra[0]) == min(10, round(0.25 * n_real)) and lineage["generator_sha256"] == "ab" * 32
    train_ds = ZarrImageDataset(store, "train", extra=extra)
    assert len(train_ds) == n_real + len(extra[0])
    arrays = train_ds.read_arrays(np.arange(len(train_ds)))
    synthetic = arrays["indices"] < 0
    assert synthetic.sum() == len(extra[0]) and (arrays["images"][synthetic] == 7.0).all()
    assert (arrays["images"][~synthetic] <= 1.0).all()
    assert sum(len(b) for b in train_ds.blocks()) == len(train_ds)
    with pytest.raises(UserError):
        ZarrImageDataset(store, "val", extra=extra)  # val and test never take synthetic samples
    result = train(store, tmp_path / "run", config, progress=False)
    assert load_checkpoint(result.best_path)["synthetic"]["n_used"] == len(extra[0])
    with pytest.raises(UserError, match="classification"):
        synthetic_extra(store, TrainConfig(task="segment", synthetic_ratio=0.5), n_real)
