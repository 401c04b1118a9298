"""The training-data loader at the codec's speed: ChunkReader (direct chunk reads and its zarr-slicing fallback),
ZarrImageDataset batches against the stored samples, float16 stores, DataLoader workers, the benchmarks' CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.codecs as zc
from torch.utils.data import DataLoader

from medpipe.config import StoreConfig
from medpipe.training.chunk_reader import ChunkReader
from medpipe.training.data import (BlockShuffleSampler, ZarrImageDataset, collate_samples, seed_worker,
                                   worker_context)
from training_store import synthetic_2d, write_store

ROOT = Path(__file__).resolve().parents[1]
N = 203  # 8 samples per chunk, 4 chunks per shard: 26 chunks, the last one and the last shard partial
SMALL = StoreConfig(chunk_bytes=8 << 10, chunks_per_shard=4)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(url, images, labels, split) of a small multi-shard store; every split non-empty."""
    images, labels = synthetic_2d(N, 16, seed=4)
    split = np.random.default_rng(5).choice(3, size=N, p=[0.7, 0.15, 0.15]).astype(np.int8)
    url = write_store(str(tmp_path_factory.mktemp("loader") / "s.zarr"), images, labels, split=split,
                      store_config=SMALL)
    return url, images, labels, split


def _float16_copy(url: str, dest: str) -> str:
    """A copy of the store whose training/images are float16 (same chunks, shards and codec)."""
    src = zarr.open_group(url, mode="r")
    out = zarr.open_group(dest, mode="w")
    for path in ("samples", "training"):
        for name, arr in src[path].arrays():
            target = out.require_group(path)
            dtype = "float16" if (path, name) == ("training", "images") else arr.dtype
            new = target.create_array(name, shape=arr.shape, dtype=dtype, chunks=arr.chunks, shards=arr.shards,
                                      compressors=arr.compressors, fill_value=arr.fill_value)
            new[...] = np.asarray(arr[...]).astype(dtype)
        out[path].attrs.update(dict(src[path].attrs))
    out.attrs.update(dict(src.attrs))
    return dest


def test_chunk_reader_reads_chunks_as_zarr_does(stored, tmp_path):
    url, images, _, _ = stored
    reader = ChunkReader(zarr.open_group(url, mode="r")["training/images"])
    assert reader.direct and reader.layout.chunk_len == 8 and reader.n_chunks == -(-N // 8)
    blocks = reader.read(list(range(reader.n_chunks))[::-1])
    got = np.concatenate(blocks[::-1])[:N]
    assert np.array_equal(got, images)
    # other layouts: unsharded zstd and raw arrays, a chunk never written (fill value), gzip (zarr's fallback)
    root = zarr.open_group(str(tmp_path / "layouts.zarr"), mode="w")
    data = np.arange(10 * 3 * 4, dtype=np.int16).reshape(10, 3, 4)
    for name, comp in (("zstd", zc.ZstdCodec(level=1)), ("raw", None), ("gzip", zc.GzipCodec())):
        arr = root.create_array(name, shape=data.shape, dtype="int16", chunks=(4, 3, 4),
                                compressors=comp, fill_value=-7)
        arr[:8] = data[:8]  # chunk 2 (rows 8-11) is never written
        r = ChunkReader(arr)
        assert r.direct is (name != "gzip")
        first, second, third = r.read([0, 1, 2])
        assert np.array_equal(np.concatenate([first, second]), data[:8])
        assert np.all(third[:2] == -7)
    # N-D chunk coordinates (3D patches): one inner chunk of a sharded volume
    vol = root.create_array("vol", shape=(1, 8, 8, 8), dtype="float32", chunks=(1, 4, 4, 4), shards=(1, 8, 8, 8),
                            compressors=zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"))
    values = np.random.default_rng(0).normal(size=vol.shape).astype(np.float32)
    vol[...] = values
    r = ChunkReader(vol)
    assert r.decodable and not r.direct
    (blob,) = r.fetch_chunks([(0, 1, 0, 1)])
    assert np.array_equal(r.decode(blob), values[:, 4:8, 0:4, 4:8])


@pytest.mark.parametrize("where", ["group", "root", "memory", "s3"])
def test_regions_read_chunk_by_chunk_equal_zarr_slicing(where, tmp_path, request):
    """RegionArray (3D patches) against zarr's own slicing: random regions of a sharded Blosc volume whose edges
    are not whole chunks, with unwritten chunks (fill value), ints among the selection, regions past the edge;
    also an array at the root of its store (its chunk keys have no path prefix: read as fill values before) and
    one on a real S3 endpoint (moto server: ranged requests for the shard index and each chunk)."""
    from zarr.storage import MemoryStore

    from medpipe.training.chunk_reader import RegionArray

    kwargs = dict(shape=(2, 37, 45, 50), dtype="float32", chunks=(1, 8, 16, 16), shards=(1, 16, 32, 32),
                  compressors=zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), fill_value=-3.0)
    if where == "group":
        arr = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("volumes/0/image", **kwargs)
    elif where == "s3":
        import s3fs

        endpoint = request.getfixturevalue("moto_s3")
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("medpipe-regions")
        opts = {"client_kwargs": {"endpoint_url": endpoint}}
        arr = zarr.open_group("s3://medpipe-regions/g.zarr", mode="w", storage_options=opts).create_array(
            "volumes/0/image", **kwargs)
    else:
        arr = zarr.create_array(MemoryStore() if where == "memory" else str(tmp_path / "root.zarr"), **kwargs)
    rng = np.random.default_rng(3)
    values = rng.normal(size=arr.shape).astype(np.float32)
    arr[:, :30] = values[:, :30]  # z >= 32 is never written: fill value
    region = RegionArray(arr)
    assert region.reader.decodable and region.shape == arr.shape and region.fill_value == -3.0
    for _ in range(60):
        lo = [int(rng.integers(0, n)) for n in arr.shape[1:]]
        hi = [int(rng.integers(a + 1, n + 4)) for a, n in zip(lo, arr.shape[1:])]
        selection = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
        assert np.array_equal(region[selection], np.asarray(arr[selection]))
    for selection in ((1, 5, slice(3, 40)), (slice(0, 1), -1), (0,), (slice(None), slice(10, 10))):
        got, want = region[selection], np.asarray(arr[selection])
        assert got.shape == want.shape and np.array_equal(got, want), selection
    assert np.array_equal(region[0, ::2, 0, 0], np.asarray(arr[0, ::2, 0, 0]))  # a step: zarr's own selection
    # raw CT normalised as read (NormalizedVolume): the same values through the chunk reader
    from medpipe.training.patches import chunk_regions
    from medpipe.volumes import NormalizedVolume

    raw = NormalizedVolume(arr, "CT", {"p00_5": -1.0, "p99_5": 1.5, "mean": 0.2, "std": 0.7})
    fast = chunk_regions(raw)
    assert isinstance(fast.array, RegionArray) and chunk_regions(fast) is fast
    assert np.array_equal(fast[:, 3:33, 40:45, 1:50], raw[:, 3:33, 40:45, 1:50])


def test_batches_are_the_stored_samples_in_sampler_order(stored):
    url, images, labels, _ = stored
    ds = ZarrImageDataset(url, "train", cache="none", chunk_cache_bytes=3 * 8 * 16 * 16 * 4)  # evicts, recycles
    sampler = BlockShuffleSampler(ds, batch_size=16, seed=2, window=3)
    sampler.set_epoch(1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples)
    expected = sampler.batches()
    got = list(loader)
    assert len(got) == len(expected) == len(sampler)
    for batch, positions in zip(got, expected):
        rows = ds.indices[positions]
        assert np.array_equal(batch["index"].numpy(), rows)
        assert np.array_equal(batch["label"].numpy(), labels[rows])
        assert batch["image"].dtype.is_floating_point and np.array_equal(batch["image"].numpy(), images[rows])
    # repeats and any order, through read_arrays; the cached dataset gives the same values
    pos = np.array([5, 0, 5, len(ds) - 1, 3])
    arrays = ds.read_arrays(pos)
    assert np.array_equal(arrays["images"], images[ds.indices[pos]])
    cached = ZarrImageDataset(url, "train", cache="memory")
    assert np.array_equal(cached.read_arrays(pos)["images"], arrays["images"])


def test_each_chunk_is_decoded_once_per_epoch(stored, monkeypatch):
    url, _, _, _ = stored
    ds = ZarrImageDataset(url, "train", cache="none", chunk_cache_bytes=1 << 30)
    decoded: list[int] = []
    original = ChunkReader.fetch

    def recording(self, chunk_ids):
        decoded.extend(int(c) for c in chunk_ids)
        return original(self, chunk_ids)

    monkeypatch.setattr(ChunkReader, "fetch", recording)
    sampler = BlockShuffleSampler(ds, batch_size=16, seed=3, window=2)
    seen = np.concatenate([b["index"].numpy() for b in DataLoader(ds, batch_sampler=sampler,
                                                                    collate_fn=collate_samples)])
    assert sorted(seen.tolist()) == ds.indices.tolist()
    assert sorted(decoded) == sorted(set((ds.indices // ds.chunk_len).tolist()))


def test_float16_store_gives_float32_tensors(stored, tmp_path):
    url, images, labels, _ = stored
    half = _float16_copy(url, str(tmp_path / "half.zarr"))
    assert zarr.open_group(half, mode="r")["training/images"].dtype == np.float16
    expected = images.astype(np.float16).astype(np.float32)
    for cache in ("none", "memory"):
        ds = ZarrImageDataset(half, "train", cache=cache)
        batch = collate_samples(ds.__getitems__(list(range(len(ds)))))
        assert str(batch["image"].dtype) == "torch.float32"
        assert np.array_equal(batch["image"].numpy(), expected[ds.indices])
        assert np.array_equal(batch["label"].numpy(), labels[ds.indices])


def test_uint8_store_gives_the_packed_values_as_float32(stored, tmp_path):
    """A packed (training_dtype uint8) store: ChunkReader decodes it itself (no zarr slicing) into the values zarr
    gives, and batches are those values as float32, with and without the in-memory cache and with 2 workers."""
    _, images, labels, split = stored
    url = write_store(str(tmp_path / "u8.zarr"), images, labels, split=split,
                      store_config=SMALL.model_copy(update={"training_dtype": "uint8"}))
    array = zarr.open_group(url, mode="r")["training/images"]
    expected = np.asarray(array[...])
    assert expected.dtype == np.float32 and np.abs(expected - images).max() <= 0.5 / 255 + 1e-7
    reader = ChunkReader(array)
    assert reader.direct and reader.layout.unpack is not None and reader.layout.chunk_len == 8
    assert np.array_equal(np.concatenate(reader.read(list(range(reader.n_chunks))))[:N], expected)
    for cache in ("none", "memory"):
        ds = ZarrImageDataset(url, "train", cache=cache)
        batch = collate_samples(ds.__getitems__(list(range(len(ds)))))
        assert str(batch["image"].dtype) == "torch.float32"
        assert np.array_equal(batch["image"].numpy(), expected[ds.indices])
    ds = ZarrImageDataset(url, "train", cache="none")
    loader = DataLoader(ds, batch_sampler=BlockShuffleSampler(ds, batch_size=16, seed=1, workers=2),
                        collate_fn=collate_samples, num_workers=2, worker_init_fn=seed_worker,
                        multiprocessing_context=worker_context(2))
    seen = {int(i): b["image"][k].numpy().copy() for b in loader for k, i in enumerate(b["index"])}
    assert sorted(seen) == sorted(ds.indices.tolist())
    assert all(np.array_equal(image, expected[i]) for i, image in seen.items())


@pytest.mark.parametrize(("offset", "scale", "astype"), [(0, 255, "u1"), (-1.0, 100, "u1"), (0.5, 100, "i1"),
                                                         (0, 1000, "u2")])
def test_chunk_reader_unpacks_any_scale_offset_packing_as_zarr_does(tmp_path, offset, scale, astype):
    """Packed arrays other than medpipe's own (an offset, signed or 16-bit integers) take the lookup path."""
    from zarr.codecs.numcodecs import FixedScaleOffset

    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    info = np.iinfo(astype)
    lo, hi = info.min / scale + offset, info.max / scale + offset
    values = np.random.default_rng(3).uniform(lo, hi, (40, 6, 5)).astype(np.float32)
    array = root.create_array("x", shape=values.shape, dtype="float32", chunks=(8, 6, 5), shards=(16, 6, 5),
                              filters=[FixedScaleOffset(offset=offset, scale=scale, dtype="<f4", astype=astype)],
                              compressors=zc.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=1))
    array[...] = values
    reader = ChunkReader(array)
    assert reader.direct and reader.layout.unpack is not None
    assert (reader.layout.unpack_divisor is not None) == (offset == 0 and astype.startswith("u"))
    assert np.array_equal(np.concatenate(reader.read(list(range(reader.n_chunks)))), np.asarray(array[...]))


def test_sampler_deals_each_window_to_one_worker(stored):
    url, _, _, _ = stored
    ds = ZarrImageDataset(url, "train", cache="none")
    plain = BlockShuffleSampler(ds, batch_size=8, seed=1, window=2)
    dealt = BlockShuffleSampler(ds, batch_size=8, seed=1, window=2, workers=2, drop_last=True)
    batches = dealt.batches()
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == sorted(plain.order().tolist()) == list(range(len(ds)))
    assert sum(len(b) < 8 for b in batches) <= 1 and len(list(dealt)) == len(dealt) == len(ds) // 8
    chunk_of = ds.indices // ds.chunk_len
    per_worker = [set(chunk_of[np.concatenate(batches[w::2])].tolist()) for w in range(2)]
    # the windows of worker 0 and of worker 1 share no chunk; one batch may straddle the two workers' streams
    assert len(per_worker[0] & per_worker[1]) <= 2 * 2


def test_zero_and_two_workers_yield_the_same_samples(stored):
    url, images, _, _ = stored
    ds = ZarrImageDataset(url, "train", cache="none")

    def epoch(workers: int) -> tuple[list[int], np.ndarray]:
        sampler = BlockShuffleSampler(ds, batch_size=16, seed=7, window=2, workers=workers)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_samples, num_workers=workers,
                            worker_init_fn=seed_worker, multiprocessing_context=worker_context(workers))
        batches = list(loader)
        assert [b["index"].tolist() for b in batches] == [ds.indices[p].tolist() for p in sampler.batches()]
        return (np.concatenate([b["index"].numpy() for b in batches]).tolist(),
                np.concatenate([b["image"].numpy() for b in batches]))

    idx0, img0 = epoch(0)
    idx2, img2 = epoch(2)
    assert Counter(idx0) == Counter(idx2) == Counter(ds.indices.tolist())
    assert np.array_equal(img2, images[idx2]) and np.array_equal(img0, images[idx0])


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_loader_benchmark_json_line():
    out = _run("benchmarks/loader.py", "--samples", "512", "--epochs", "1", "--workers", "1", "--cases", "1",
               "--shape", "32", "64", "64", "--patch", "16", "32", "32", "--patches", "2", "--json")
    figures = json.loads(out.strip().splitlines()[-1])
    for key in ("loader_vs_codec_decode", "loader_1_workers_vs_0", "loader_vs_persistent_dataset",
                "loader_samples_per_s_0_workers", "codec_decode_samples_per_s", "tensor_batches_samples_per_s",
                "cache_dataset_samples_per_s", "patches_per_s", "patch_limit_per_s", "decode_gather_samples_per_s",
                "loader_vs_decode_gather"):
        assert figures[key] > 0, key
    assert figures["loader_vs_codec_decode"] == pytest.approx(
        figures["loader_samples_per_s_0_workers"] / figures["codec_decode_samples_per_s"], rel=1e-3)


def test_gpu_train_dry_run():
    out = _run("benchmarks/gpu_train.py", "--dry-run")
    assert "dry run" in out and "2d" in out and "3d" in out


def test_packed_batches_travel_through_the_ring_and_free_their_slots(monkeypatch):
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import medpipe.training.batches as batches

    monkeypatch.setattr(batches, "_ring", None)
    monkeypatch.setattr(batches, "_rings", {})
    specs = {"images": ((3, 1, 4, 4), np.dtype("float32")), "labels": ((3,), np.dtype("int64"))}

    def one(value: float) -> tuple[batches.PackedBatch, bytes]:
        buffers = batches.BatchBuffers(specs)
        buffers("images", (3, 1, 4, 4), np.dtype("float32"))[...] = value
        buffers("labels", (3,), np.dtype("int64"))[...] = [1, 2, 3]
        packed = buffers.packed({"images": "image", "labels": "label"})
        buf = io.BytesIO()
        ForkingPickler(buf).dump(packed)
        return packed, buf.getvalue()

    ring = None
    for k in range(2 * batches.RING_SLOTS):  # more batches than slots: each slot is freed when its batch is dropped
        packed, data = one(float(k))
        ring = packed.ring
        got = pickle.loads(data)
        assert type(got) is dict and got["label"].tolist() == [1, 2, 3] and float(got["image"].max()) == k
        del packed
        assert int(ring.states.sum()) == 1  # read in place: the slot is held while the batch's tensors live
        image = got["image"]
        del got
        assert int(ring.states.sum()) == 1 and float(image.max()) == k  # one tensor of it is enough
        del image
    assert ring is not None and int(ring.states.sum()) == 0
    packed, _ = one(9.0)  # pickled but never read: its slot stays taken until the main process reads it
    assert int(ring.states.sum()) == 1
    ring.release(packed.slot)
    unsent = batches.BatchBuffers(specs).packed({"images": "image", "labels": "label"})
    assert int(ring.states.sum()) == 1
    del unsent  # dropped without being sent (e.g. re-collated by default_collate): the slot is free again
    assert int(ring.states.sum()) == 0
    held = [pickle.loads(one(float(k))[1]) for k in range(batches.RING_SLOTS)]  # a consumer keeping every batch
    assert int(ring.states.sum()) == batches.RING_SLOTS
    packed, data = one(42.0)  # no free slot: sent as its own shared block, not blocked
    assert packed.ring is None and float(pickle.loads(data)["image"].max()) == 42.0
    assert [float(b["image"].max()) for b in held] == [float(k) for k in range(batches.RING_SLOTS)]  # intact
    del held, packed
    assert int(ring.states.sum()) == 0
    monkeypatch.setattr(batches, "shared_memory_free_bytes", lambda path=batches.SHM_DIR: 0)
    monkeypatch.setattr(batches, "_ring", None)
    assert batches.BatchBuffers(specs).ring is None  # no room for a ring: one shared block per batch
