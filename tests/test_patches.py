"""Patch sampling, patch reads and sliding-window inference (medpipe.training.patches, medpipe.inference)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, MemoryStore, WrapperStore

from medpipe.inference import predict_volume
from medpipe.training.patches import (PatchDataset, foreground_draws, foreground_index, foreground_index_zarr,
                                      origin_range, patch_augmentation, read_patch, sample_patch_origins)


class CountingStore(WrapperStore):
    """Records the keys of every read (the list is shared by the copies zarr makes, e.g. read-only ones)."""

    def __init__(self, store: Any, reads: list[str] | None = None) -> None:
        super().__init__(store)
        self.reads: list[str] = [] if reads is None else reads

    def _with_store(self, store: Any) -> "CountingStore":
        return type(self)(store, self.reads)

    async def get(self, key, prototype, byte_range=None):  # type: ignore[override]
        self.reads.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):  # type: ignore[override]
        key_ranges = list(key_ranges)
        self.reads.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


def _memory_array(data: np.ndarray, chunks: tuple[int, ...], fill_value: Any = 0) -> zarr.Array:
    arr = zarr.create_array(MemoryStore(), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=fill_value)
    arr[...] = data
    return arr


def _contains(origins: np.ndarray, patch: tuple[int, int, int], voxel: np.ndarray) -> np.ndarray:
    return np.all((origins <= voxel) & (voxel < origins + np.asarray(patch)), axis=1)


# -- foreground index ---------------------------------------------------------------------------------------------
def test_foreground_index_is_reproducible_subset():
    rng = np.random.default_rng(1)
    mask = (rng.random((20, 21, 22)) < 0.2).astype(np.uint8) * 2
    full = foreground_index(mask, max_points=10**9)
    assert full.shape == (int((mask > 0).sum()), 3) and full.dtype == np.int64
    sub = foreground_index(mask, max_points=100, seed=3)
    assert sub.shape == (100, 3)
    assert np.array_equal(sub, foreground_index(mask, max_points=100, seed=3))
    assert not np.array_equal(sub, foreground_index(mask, max_points=100, seed=4))
    assert np.all(mask[tuple(sub.T)] > 0)
    assert np.array_equal(foreground_index(mask[None], max_points=100, seed=3), sub)  # channel-first works too
    assert foreground_index(np.zeros((4, 4, 4)), 10).shape == (0, 3)


def test_foreground_index_zarr_reads_slabs_and_subsamples():
    rng = np.random.default_rng(2)
    mask = (rng.random((1, 24, 16, 16)) < 0.1).astype(np.uint8)
    arr = _memory_array(mask, (1, 8, 8, 8))
    full = foreground_index_zarr(arr, max_points=10**9)
    assert np.array_equal(full, foreground_index(mask, max_points=10**9))
    sub = foreground_index_zarr(arr, max_points=50, seed=5)
    assert sub.shape == (50, 3) and len({tuple(r) for r in sub.tolist()}) == 50
    assert np.all(mask[0][tuple(sub.T)] > 0)
    assert np.array_equal(sub, foreground_index_zarr(arr, max_points=50, seed=5))


# -- origins --------------------------------------------------------------------------------------------------------
def _uniform_hit_probability(shape, patch, voxel) -> float:
    """Exact probability that a uniform origin in [0, s - p] puts `voxel` inside the patch."""
    q = 1.0
    for s, p, c in zip(shape, patch, voxel):
        origins = np.arange(0, s - p + 1)
        q *= float(np.mean((origins <= c) & (c < origins + p)))
    return q


@pytest.mark.parametrize("oversample", [0.0, 1 / 3, 0.5, 1.0])
def test_foreground_rate_matches_oversample(oversample):
    shape, patch = (48, 40, 56), (16, 16, 16)
    lesion = np.array([[30, 3, 50]])  # one voxel near two borders
    rng = np.random.default_rng(7)
    n = 20000
    origins = np.concatenate([sample_patch_origins(shape, patch, 4, rng, lesion, oversample) for _ in range(n // 4)])
    lo, hi = origin_range(shape, patch)
    assert np.all((origins >= lo) & (origins <= hi))  # every patch inside the volume
    hit = _contains(origins, patch, lesion[0]).mean()
    q = _uniform_hit_probability(shape, patch, lesion[0])
    assert q < 0.1
    assert abs(hit - (oversample + (1 - oversample) * q)) < 0.05


def test_foreground_patches_contain_their_voxel_and_pad_small_axes():
    shape, patch = (10, 40, 33), (16, 16, 16)  # z smaller than the patch: padded, never cut
    rng = np.random.default_rng(0)
    fg = np.array([[0, 0, 0], [9, 39, 32], [5, 20, 16], [9, 0, 32]])
    for _ in range(200):
        origins = sample_patch_origins(shape, patch, 4, rng, fg[[0, 1, 2, 3]], oversample=1.0)
        # each patch contains at least one foreground voxel: the one it was centred on
        inside = np.stack([_contains(origins, patch, v) for v in fg], axis=1)
        assert inside.any(axis=1).all()
        assert np.all((-6 <= origins[:, 0]) & (origins[:, 0] <= 0))  # whole z axis inside the patch
        assert np.all((0 <= origins[:, 1:]) & (origins[:, 1:] <= np.array([24, 17])))
    uniform = sample_patch_origins(shape, patch, 5000, rng, None, oversample=1.0)  # no foreground: uniform
    assert set(np.unique(uniform[:, 0]).tolist()) == set(range(-6, 1))


def test_last_rule_forces_last_of_batch():
    rng = np.random.default_rng(0)
    assert foreground_draws(3, 1 / 3, rng, "last").tolist() == [False, False, True]
    assert foreground_draws(2, 1 / 3, rng, "last").tolist() == [False, True]  # nnU-Net: quantised to 1/2
    assert foreground_draws(12, 1 / 3, rng, "last").sum() == 4
    assert not foreground_draws(4, 0.0, rng, "last").any()
    with pytest.raises(ValueError):
        foreground_draws(4, 1.5, rng)


# -- read_patch -----------------------------------------------------------------------------------------------------
def _reference(full: np.ndarray, origin, patch, pad) -> np.ndarray:
    big = 40
    widths = [(0, 0)] * (full.ndim - 3) + [(big, big)] * 3
    padded = (np.pad(full, widths, mode="edge") if pad == "edge"
              else np.pad(full, widths, mode="constant", constant_values=pad))
    sel = tuple(slice(o + big, o + big + p) for o, p in zip(origin, patch))
    return padded[(Ellipsis, *sel)]


@pytest.mark.parametrize("pad", ["fill", "edge", 7.5])
def test_read_patch_equals_numpy_slicing(pad):
    rng = np.random.default_rng(3)
    full = rng.normal(size=(2, 20, 17, 24)).astype(np.float32)
    arr = _memory_array(full, (1, 8, 8, 8), fill_value=-5.0)
    value = -5.0 if pad == "fill" else pad
    patch = (8, 12, 10)
    origins = [(0, 0, 0), (12, 5, 14), (-3, -4, -2), (15, 10, 20), (-30, 2, 3), (19, 16, 23), (-8, -12, -10),
               (20, 17, 24)]
    for origin in origins + [tuple(rng.integers(-12, 25, size=3).tolist()) for _ in range(30)]:
        got = read_patch(arr, origin, patch, pad=pad)
        assert got.shape == (2, *patch) and got.dtype == np.float32
        assert np.array_equal(got, _reference(full, origin, patch, value)), origin
    # a bigger patch than the volume, and a leading selection of a stacked (N, C, Z, Y, X) array
    assert np.array_equal(read_patch(arr, (-2, -3, -1), (24, 24, 32), pad=pad),
                          _reference(full, (-2, -3, -1), (24, 24, 32), value))
    stacked = _memory_array(np.stack([full, full + 1]), (1, 1, 8, 8, 8), fill_value=-5.0)
    assert np.array_equal(read_patch(stacked, (3, -2, 20), patch, leading=(1,), pad=pad),
                          _reference(full + 1, (3, -2, 20), patch, value))
    assert np.array_equal(read_patch(stacked, (3, -2, 20), patch, leading=(1, 0), pad=pad),
                          _reference(full[0] + 1, (3, -2, 20), patch, value))


def test_read_patch_reads_only_touched_chunks(tmp_path):
    data = np.arange(32**3, dtype=np.float32).reshape(1, 32, 32, 32)
    arr = zarr.create_array(LocalStore(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 8, 8, 8), dtype="float32",
                            compressors=zarr.codecs.ZstdCodec(level=1))
    arr[...] = data
    reads: list[str] = []
    counted = zarr.open_array(CountingStore(LocalStore(tmp_path / "a.zarr", read_only=True), reads), mode="r")
    cases = [((5, 9, 0), (8, 8, 8), {"c/0/0/1/0", "c/0/1/1/0", "c/0/0/2/0", "c/0/1/2/0"}),
             ((8, 8, 8), (8, 8, 8), {"c/0/1/1/1"}),
             ((-3, 28, 30), (8, 8, 8), {"c/0/0/3/3"}),
             ((0, 0, 0), (16, 8, 1), {"c/0/0/0/0", "c/0/1/0/0"}),
             ((40, 0, 0), (8, 8, 8), set())]
    for origin, patch, expected in cases:
        reads.clear()
        got = read_patch(counted, origin, patch)
        assert set(reads) == expected and len(reads) == len(expected), (origin, reads)
        assert np.array_equal(got, _reference(data, origin, patch, 0.0))


# -- PatchDataset ---------------------------------------------------------------------------------------------------
def _cases():
    rng = np.random.default_rng(4)
    images, masks, lesions = [], [], []
    for k, shape in enumerate([(24, 32, 28), (12, 20, 40)]):
        img = rng.normal(size=(1, *shape)).astype(np.float32)
        mask = np.zeros((1, *shape), np.uint8)
        c = np.array(shape) // 3 + k
        mask[0, c[0] : c[0] + 2, c[1] : c[1] + 2, c[2] : c[2] + 2] = 1
        images.append(_memory_array(img, (1, 8, 8, 8)))
        masks.append(_memory_array(mask, (1, 8, 8, 8)))
        lesions.append(c)
    return images, masks, lesions


def test_patch_dataset_items():
    images, masks, _ = _cases()
    ds = PatchDataset(images, masks, patch=(16, 16, 16), samples_per_epoch=40, oversample=0.5, seed=1)
    assert len(ds) == 40
    item = ds[3]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 16, 16) and item["mask"].dtype == torch.uint8
    assert item["case"] in (0, 1) and item["origin"].shape == (3,)
    again = ds[3]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
    case, origin = item["case"], item["origin"].numpy()
    full = np.asarray(images[case][...])
    assert np.array_equal(item["image"].numpy(), _reference(full, origin, (16, 16, 16), "edge"))
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert torch.equal(copy[3]["image"], item["image"]) and torch.equal(copy[3]["mask"], item["mask"])
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["image"], copy[i]["image"]) for i in range(5))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["case"].shape == (4,)


def test_patch_dataset_foreground_rate_and_transforms():
    images, masks, lesions = _cases()

    def hit_rate(oversample: float) -> float:
        ds = PatchDataset(images, masks, patch=(8, 8, 8), samples_per_epoch=3000, oversample=oversample, seed=2)
        hits = 0
        for i in range(len(ds)):
            case, origin = ds.draw(i)  # origins only, no reading
            hits += bool(np.all((origin <= lesions[case] + 1) & (lesions[case] < origin + 8)))  # overlaps the 2^3 lesion
        return hits / len(ds)

    uniform = hit_rate(0.0)  # ~0.14: a uniform 8^3 patch sometimes hits the lesion too
    assert uniform < 0.2
    assert abs(hit_rate(1 / 3) - (1 / 3 + 2 / 3 * uniform)) < 0.05
    assert hit_rate(1.0) == 1.0
    last = PatchDataset(images, masks, patch=(8, 8, 8), samples_per_epoch=30, oversample=1 / 3, seed=2, rule="last",
                        batch_size=3)
    for i in range(2, 30, 3):  # the last of each batch of 3 is a foreground patch
        case, origin = last.draw(i)
        assert np.all((origin <= lesions[case] + 1) & (lesions[case] < origin + 8))
    aug = PatchDataset(images, masks, patch=(16, 16, 16), samples_per_epoch=8, oversample=1.0, seed=3,
                       transform=patch_augmentation())
    for i in range(8):
        item = aug[i]
        assert type(item["image"]) is torch.Tensor and item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (1, 16, 16, 16)
        assert int(item["mask"].sum()) == int(read_patch(masks[item["case"]], item["origin"].numpy(),
                                                         (16, 16, 16)).sum())  # flips/rot90 keep the labels


# -- sliding-window inference ---------------------------------------------------------------------------------------
def _net(kernel: int, channels: int = 1, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    pad = kernel // 2
    return torch.nn.Sequential(torch.nn.Conv3d(channels, 6, kernel, padding=pad), torch.nn.ReLU(),
                               torch.nn.Conv3d(6, classes, kernel, padding=pad))


def _whole(model: torch.nn.Module, volume: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(volume)[None]), dim=1)[0].numpy()


@pytest.mark.parametrize("gaussian", [True, False])
def test_sliding_window_equals_whole_forward(gaussian):
    rng = np.random.default_rng(5)
    conv = _net(3, channels=2)
    volume = rng.normal(size=(2, 16, 12, 20)).astype(np.float32)  # exactly one window
    got = predict_volume(conv, volume, patch=(16, 12, 20), gaussian=gaussian)
    assert got.shape == (3, 16, 12, 20) and got.dtype == np.float32
    np.testing.assert_allclose(got, _whole(conv, volume), atol=1e-5)
    pointwise = _net(1)  # translation-exact: any tiling, overlap and padding must give the whole forward
    big = rng.normal(size=(1, 21, 26, 30)).astype(np.float32)
    for patch, overlap in [((8, 8, 8), 0.5), ((10, 12, 7), 0.25), ((32, 32, 32), 0.5)]:
        got = predict_volume(pointwise, big, patch=patch, overlap=overlap, gaussian=gaussian, batch_size=3)
        np.testing.assert_allclose(got, _whole(pointwise, big), atol=1e-5)


def test_tta_flips_on_flip_equivariant_model():
    model = _net(3)
    with torch.no_grad():  # kernels symmetric under every flip make the model flip-equivariant
        for layer in (model[0], model[2]):
            w = layer.weight
            w.copy_(sum(torch.flip(w, axes) for axes in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]) / 8)
    volume = np.random.default_rng(6).normal(size=(1, 20, 18, 22)).astype(np.float32)
    plain = predict_volume(model, volume, patch=(12, 12, 12))
    np.testing.assert_allclose(predict_volume(model, volume, patch=(12, 12, 12), tta_flips=True), plain, atol=1e-5)
    skewed = _net(3)  # not equivariant: TTA changes the result
    a = predict_volume(skewed, volume, patch=(12, 12, 12))
    b = predict_volume(skewed, volume, patch=(12, 12, 12), tta_flips=True)
    assert np.abs(a - b).max() > 1e-3
    model.train()
    predict_volume(model, volume, patch=(12, 12, 12))
    assert model.training  # mode restored
