"""Codec choice per store layer (medpipe/codecs.py): exact round-trips, config validation, a fresh reader process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
import zarr

from medpipe.codecs import (JPEGLS_NAME, LAYERS, CodecError, JpegLsCodec, PackingError, as_stored, codec_chain, decode_frames,
                            encode_frames, for_writing)
from medpipe.config import IngestConfig, PreprocessConfig, StoreConfig
from medpipe.signals.config import SignalIngestConfig
from medpipe.store import create_training_arrays, read_archive_image, samples_per_chunk
from medpipe.store_batch import write_archive_image

RNG = np.random.default_rng(7)


def _image(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth image plus noise spanning the dtype's whole range (extremes included)."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        return RNG.normal(0, 1, shape).astype(dtype)
    ramp = np.linspace(info.min, info.max, num=int(np.prod(shape))).reshape(shape)
    noise = RNG.integers(-50, 50, shape)
    out = np.clip(ramp + noise, info.min, info.max).astype(dtype)
    out.flat[0], out.flat[-1] = info.min, info.max
    return out


def _codec_names(array: zarr.Array) -> list[str]:
    return [c["name"] for c in array.metadata.to_dict()["codecs"]]


ARCHIVE_CASES = [("int16", (1, 40, 37)), ("uint16", (1, 33, 64)), ("uint8", (1, 50, 50)), ("uint8", (3, 31, 29)),
                 ("float32", (1, 20, 24)), ("int16", (1, 70, 16, 18)), ("int8", (1, 9, 9))]


@pytest.mark.parametrize("codec", ["auto", "jpegls", "zstd", "lz4", "none"])
@pytest.mark.parametrize(("dtype", "shape"), ARCHIVE_CASES)
def test_archive_round_trips_exactly(tmp_path: Path, codec: str, dtype: str, shape: tuple[int, ...]) -> None:
    config = StoreConfig(archive_codec=codec)  # type: ignore[arg-type]
    pixels = _image(dtype, shape)
    mask = (RNG.random((1, *shape[1:])) > 0.7).astype(np.uint8)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    if codec == "jpegls" and dtype == "float32":
        with pytest.raises(CodecError, match="8- and 16-bit integer"):
            write_archive_image(root, "u", pixels, (1.0,) * (len(shape) - 1), config, mask=mask)
        return
    write_archive_image(root, "u", pixels, (1.0,) * (len(shape) - 1), config, mask=mask, attrs={"k": 1})
    back, back_mask, attrs = read_archive_image(zarr.open_group(tmp_path / "s.zarr", mode="r"), "u")
    assert back.dtype == pixels.dtype and np.array_equal(back, pixels)
    assert back_mask is not None and np.array_equal(back_mask, mask) and attrs == {"k": 1}
    names = _codec_names(zarr.open_array(tmp_path / "s.zarr/archive/u/0", mode="r"))
    integer = np.dtype(dtype).kind in "iu"
    assert (JPEGLS_NAME in names) == (codec == "jpegls" or (codec == "auto" and integer))
    mask_names = _codec_names(zarr.open_array(tmp_path / "s.zarr/archive/u/labels/mask/0", mode="r"))
    assert (JPEGLS_NAME in mask_names) == (codec == "jpegls")


def test_archive_metadata_is_one_line_ngff(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    write_archive_image(root, "u", _image("uint8", (1, 16, 16)), (0.5, 0.5), StoreConfig())
    for path in (tmp_path / "s.zarr/archive/u/zarr.json", tmp_path / "s.zarr/archive/u/0/zarr.json"):
        text = path.read_text()
        assert "\n" not in text.strip()
    group = json.loads((tmp_path / "s.zarr/archive/u/zarr.json").read_text())
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5" and ome["multiscales"][0]["datasets"][0]["path"] == "0"
    array = json.loads((tmp_path / "s.zarr/archive/u/0/zarr.json").read_text())
    assert array["dimension_names"] == ["c", "y", "x"]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
def test_frames_round_trip_extremes(dtype: str) -> None:
    info = np.iinfo(dtype)
    array = np.array([[[info.min, info.max], [0, -1 if info.min < 0 else 1]]] * 3, dtype=dtype)
    assert np.array_equal(decode_frames(encode_frames(array), np.dtype(dtype), array.shape), array)


def test_frames_refuse_other_dtypes() -> None:
    with pytest.raises(ValueError, match="8- and 16-bit"):
        encode_frames(np.zeros((4, 4), np.int32))


@pytest.mark.parametrize("training_dtype", ["float32", "float16"])
def test_training_layers_round_trip(tmp_path: Path, training_dtype: str) -> None:
    config = StoreConfig(training_dtype=training_dtype)  # type: ignore[arg-type]
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    n, shape = 37, (1, 16, 16)
    create_training_arrays(root, n, shape, True, config)
    images = RNG.normal(0, 1, (n, *shape)).astype(training_dtype)
    masks = (RNG.random((n, *shape)) > 0.5).astype(np.uint8)
    root["training/images"][...] = images
    root["training/masks"][...] = masks
    reopened = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert reopened["training/images"].dtype == np.dtype(training_dtype)
    assert np.array_equal(reopened["training/images"][...], images)
    assert np.array_equal(reopened["training/masks"][...], masks)
    for layer in LAYERS:
        for dtype in ("float32", "float16", "uint8"):
            assert isinstance(codec_chain(layer, config, dtype)["compressors"], tuple)


def test_float16_training_arrays_hold_half_the_bytes(tmp_path: Path) -> None:
    shape = (1, 64, 64)
    arrays = {}
    for dtype in ("float32", "float16"):
        config = StoreConfig(training_dtype=dtype, chunk_bytes=1 << 16)  # type: ignore[arg-type]
        root = zarr.open_group(tmp_path / f"{dtype}.zarr", mode="w")
        create_training_arrays(root, 100, shape, False, config)
        arrays[dtype] = root["training/images"]
    f32, f16 = arrays["float32"], arrays["float16"]
    assert f16.dtype == np.float16 and f32.dtype == np.float32
    assert f16.nbytes * 2 == f32.nbytes
    per_sample_32, per_sample_16 = 64 * 64 * 4, 64 * 64 * 2
    assert per_sample_16 * 2 == per_sample_32
    # same chunk_bytes target: a float16 chunk holds twice the samples, so each sample's share is half
    assert f32.chunks[0] == samples_per_chunk(shape, 4, 1 << 16) == 4
    assert f16.chunks[0] == samples_per_chunk(shape, 2, 1 << 16) == 8
    assert f16.chunks[0] * per_sample_16 == f32.chunks[0] * per_sample_32 == 1 << 16


def test_uint8_training_arrays_hold_0_to_1_on_a_grid_of_1_255(tmp_path: Path) -> None:
    """Packed arrays: float32 to every reader (a fresh zarr process too), nearest multiple of 1/255, chunks sized as
    float32 ones, a quarter of the float32 bytes before compression and less than half after."""
    shape, n = (1, 32, 32), 64
    images = np.clip(np.linspace(0, 1, n * 32 * 32).reshape(n, *shape) + RNG.normal(0, 0.02, (n, *shape)), 0, 1)
    images[0, 0, 0, :3] = (0.0, 1.0, 0.5 / 255)  # the ends, and a value halfway between two steps
    images = images.astype(np.float32)
    sizes = {}
    for dtype in ("float32", "uint8"):
        root = zarr.open_group(tmp_path / f"{dtype}.zarr", mode="w")
        create_training_arrays(root, n, shape, False, StoreConfig(training_dtype=dtype, chunk_bytes=1 << 14))
        root["training/images"][...] = images
        chunks = (tmp_path / f"{dtype}.zarr/training/images/c").rglob("*")
        sizes[dtype] = sum(f.stat().st_size for f in chunks if f.is_file())
    packed = zarr.open_group(tmp_path / "uint8.zarr", mode="r")["training/images"]
    assert packed.dtype == np.float32 and packed.chunks == (4, *shape)  # 16 KiB of float32 per chunk
    back = np.asarray(packed[...])
    steps = back.astype(np.float64) * 255
    assert np.abs(steps - np.rint(steps)).max() < 1e-4  # on the grid, and (below) its nearest point to each value
    assert np.abs(back - images).max() <= 0.5 / 255 + 1e-7 and back[0, 0, 0, :2].tolist() == [0.0, 1.0]
    assert np.array_equal(as_stored(packed, images), back)  # what the ingest hashes is what is read
    assert sizes["uint8"] < 0.5 * sizes["float32"]
    code = ("import zarr, numpy as np, sys; a = zarr.open_array(sys.argv[1], mode='r'); "
            "print(a.dtype, float(np.asarray(a[...]).sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "uint8.zarr/training/images")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "float32" and abs(float(out[1]) - float(back.sum())) < 1e-2


@pytest.mark.parametrize("bad", [1.5, -0.01, np.nan])
def test_uint8_packing_refuses_what_it_would_wrap(tmp_path: Path, bad: float) -> None:
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    create_training_arrays(root, 4, (1, 4, 4), False, StoreConfig(training_dtype="uint8"))
    values = np.full((4, 1, 4, 4), 0.5, np.float32)
    values[2, 0, 1, 1] = bad
    with pytest.raises(PackingError, match="0..1"):
        as_stored(root["training/images"], values)
    floats = zarr.open_group(tmp_path / "f.zarr", mode="w")
    create_training_arrays(floats, 4, (1, 4, 4), False, StoreConfig())
    assert as_stored(floats["training/images"], values) is values  # nothing to pack


def test_uint8_training_dtype_is_for_2d_image_stores() -> None:
    IngestConfig(store=StoreConfig(training_dtype="uint8"))
    with pytest.raises(pydantic.ValidationError, match="uint8 is for 2D stores"):
        IngestConfig(store=StoreConfig(training_dtype="uint8"), preprocess=PreprocessConfig(kind="3d",
                                                                                            shape=(8, 8, 8)))
    with pytest.raises(pydantic.ValidationError, match="signal windows are stored as float32"):
        SignalIngestConfig(store=StoreConfig(training_dtype="uint8"))


def test_volume_codec_jpegls_applies_to_integer_volume_images_only() -> None:
    jpegls = StoreConfig(volume_codec="jpegls")
    assert isinstance(codec_chain("volume_image", jpegls, "int16")["serializer"], JpegLsCodec)
    for layer, dtype, config in (("volume_image", "float32", jpegls), ("volume_mask", "uint8", jpegls),
                                 ("training_images", "float32", jpegls), ("volume_image", "int16", StoreConfig())):
        chain = codec_chain(layer, config, dtype)  # type: ignore[arg-type]
        assert chain["serializer"] == "auto" and chain["compressors"], (layer, dtype)
    with pytest.raises(pydantic.ValidationError):
        StoreConfig(volume_codec="jpeg")  # type: ignore[arg-type]


def test_store_config_fields_validate() -> None:
    config = StoreConfig()
    assert (config.archive_codec, config.training_dtype, config.codec) == ("auto", "float32", "zstd")
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert json.loads(json.dumps(IngestConfig().lineage_dict()))["store"]["training_dtype"] == "float32"
    for bad in ({"training_dtype": "bfloat16"}, {"archive_codec": "jpeg"}, {"archive_level": 10},
                {"level": -1}, {"codec": "gzip"}):
        with pytest.raises(pydantic.ValidationError):
            StoreConfig(**bad)  # type: ignore[arg-type]
    assert "bfloat16" in StoreConfig.model_fields["training_dtype"].description  # type: ignore[operator]


def test_unknown_layer_is_a_one_line_error() -> None:
    with pytest.raises(CodecError, match="unknown store layer 'thumbnails'") as info:
        codec_chain("thumbnails", StoreConfig(), "uint8")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_jpegls_store_reopens_in_a_fresh_process(tmp_path: Path) -> None:
    pixels = _image("int16", (1, 3, 24, 20))
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    write_archive_image(root, "u", pixels, (2.0, 1.0, 1.0), StoreConfig())
    np.save(tmp_path / "want.npy", pixels)
    script = (
        "import sys, numpy as np, zarr, medpipe.store\n"
        f"a = zarr.open_array({str(tmp_path / 's.zarr/archive/u/0')!r}, mode='r')\n"
        f"assert np.array_equal(a[...], np.load({str(tmp_path / 'want.npy')!r}))\n"
        "print(a.metadata.to_dict()['codecs'][0]['name'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == JPEGLS_NAME


def test_blosc_shuffle_follows_the_dtype(tmp_path: Path) -> None:
    config = StoreConfig()
    for dtype, shuffle in (("uint8", "bitshuffle"), ("float16", "shuffle"), ("float32", "shuffle")):
        arr = zarr.create_array(tmp_path / f"{dtype}.zarr", shape=(4, 4), dtype=dtype,
                                **codec_chain("training_images", config, dtype))
        blosc = arr.metadata.to_dict()["codecs"][-1]
        assert blosc["name"] == "blosc" and blosc["configuration"]["shuffle"] == shuffle
        assert blosc["configuration"]["typesize"] == np.dtype(dtype).itemsize


def test_every_chunk_is_written_even_when_it_equals_the_fill_value(tmp_path: Path) -> None:
    """zarr's empty-chunk test costs more than compressing the chunk (docs/benchmarks.md): medpipe's arrays store
    all-zero chunks too, both when created through `codec_chain` and when reopened with `for_writing`."""
    config = StoreConfig()
    for layer in LAYERS:
        dtype = "uint16" if layer == "archive" else "uint8"
        arr = zarr.create_array(tmp_path / f"{layer}.zarr", shape=(2, 8, 8), chunks=(1, 8, 8), dtype=dtype,
                                fill_value=0, **codec_chain(layer, config, dtype))
        arr[...] = np.zeros((2, 8, 8), dtype)
        assert sorted(p.name for p in (tmp_path / f"{layer}.zarr" / "c").iterdir()) == ["0", "1"], layer
    reopened = zarr.open_array(tmp_path / "plain.zarr", mode="w", shape=(2, 8), chunks=(1, 8), dtype="uint8",
                               fill_value=0)
    reopened[...] = np.zeros((2, 8), np.uint8)
    assert not (tmp_path / "plain.zarr" / "c").exists()  # zarr's default: empty chunks are skipped
    for_writing(zarr.open_array(tmp_path / "plain.zarr", mode="a"))[...] = np.zeros((2, 8), np.uint8)
    assert sorted(p.name for p in (tmp_path / "plain.zarr" / "c").iterdir()) == ["0", "1"]
