"""Lossless codec benchmark per store layer: write (encode) MB/s, read (decode) MB/s and stored/raw ratio.

Data: a synthetic 512x512 CT series (medpipe.demo) and pydicom's real CT slice (693_UNCR, int16); the demo's
8-bit PNGs, skimage's camera (grey) and astronaut (RGB, stored channel-first as the archive does); 16-bit X-rays
(pydicom's RG1_UNCI CR, 15 bits stored, and the demo's); float32 and float16 normalised training samples and a
uint8 mask. Every candidate is checked to round-trip exactly. Then the archive of the demo PNGs written with
medpipe.store_batch.write_archive_image, chunk bytes and zarr.json bytes per image, against the PNG files.

    .venv/bin/python benchmarks/codecs.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import imagecodecs
import imageio.v3 as iio
import numcodecs
import numpy as np
import pydicom
import skimage.data
import zarr
from pydicom.data import get_testdata_file

from medpipe.codecs import decode_frames, encode_frames, jpegls_supports
from medpipe.config import PreprocessConfig, StoreConfig
from medpipe.demo import DemoSpec, generate_demo_dataset
from medpipe.preprocess import to_training_sample
from medpipe.store import create_training_arrays
from medpipe.store_batch import write_archive_image

Encode = Callable[[np.ndarray], bytes]
Decode = Callable[[bytes, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Candidate:
    """A codec under test: encode, decode (given the original for dtype/shape) and which arrays it takes."""

    name: str
    encode: Encode
    decode: Decode
    accepts: Callable[[np.ndarray], bool]


def _numcodec(codec: numcodecs.abc.Codec) -> tuple[Encode, Decode]:
    def enc(a: np.ndarray) -> bytes:
        return bytes(codec.encode(np.ascontiguousarray(a)))

    def dec(b: bytes, like: np.ndarray) -> np.ndarray:
        return np.frombuffer(codec.decode(b), like.dtype).reshape(like.shape)
    return enc, dec


def _per_frame(encode: Callable[[np.ndarray], bytes], decode: Callable[[bytes], np.ndarray]) -> tuple[Encode, Decode]:
    """An image codec applied to each 2D frame; a list of frames stands for the joined bytes."""
    def enc(a: np.ndarray) -> bytes:
        frames = [encode(np.ascontiguousarray(f)) for f in a.reshape(-1, *a.shape[-2:])]
        return _join(frames)

    def dec(b: bytes, like: np.ndarray) -> np.ndarray:
        return np.stack([decode(f) for f in _split(b)]).reshape(like.shape)
    return enc, dec


def _join(frames: list[bytes]) -> bytes:
    head = np.array([len(frames), *map(len, frames)], "<u4").tobytes()
    return head + b"".join(frames)


def _split(data: bytes) -> list[bytes]:
    n = int(np.frombuffer(data[:4], "<u4")[0])
    lengths = np.frombuffer(data[4 : 4 + 4 * n], "<u4")
    out, pos = [], 4 + 4 * n
    for length in lengths:
        out.append(data[pos : pos + int(length)])
        pos += int(length)
    return out


def _unsigned_8_16(a: np.ndarray) -> bool:
    return a.dtype.kind == "u" and a.dtype.itemsize in (1, 2)


def candidates() -> list[Candidate]:
    """Blosc zstd 1/3/5 byte/bit shuffle, Blosc lz4, plain Zstd, JPEG-LS (medpipe.jpegls), JPEG-XL, PNG, WebP."""
    out = []
    for level in (1, 3, 5):
        for shuffle, tag in ((numcodecs.Blosc.SHUFFLE, "byte"), (numcodecs.Blosc.BITSHUFFLE, "bit")):
            out.append(Candidate(f"blosc-zstd{level}-{tag}",
                                 *_numcodec(numcodecs.Blosc("zstd", level, shuffle)), lambda a: True))
    out.append(Candidate("blosc-lz4-byte", *_numcodec(numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE)),
                         lambda a: True))
    out.append(Candidate("zstd3", *_numcodec(numcodecs.Zstd(3)), lambda a: True))
    out.append(Candidate("jpegls", encode_frames, lambda b, like: decode_frames(b, like.dtype, like.shape),
                         lambda a: jpegls_supports(a.dtype)))
    out.append(Candidate("jpegxl-e3", *_per_frame(lambda f: imagecodecs.jpegxl_encode(f, lossless=True, effort=3),
                                                  imagecodecs.jpegxl_decode), _unsigned_8_16))
    out.append(Candidate("png", *_per_frame(imagecodecs.png_encode, imagecodecs.png_decode), _unsigned_8_16))
    out.append(Candidate("webp-ll", *_per_frame(
        lambda f: imagecodecs.webp_encode(np.repeat(f[..., None], 3, -1), lossless=True),
        lambda b: imagecodecs.webp_decode(b)[..., 0]), lambda a: a.dtype == np.uint8))
    return out


def _dicom_pixels(path: str | Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path).pixel_array)


def datasets(work: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (layer, array as the layer stores it: (C, [Z,] Y, X) archive images, (N, C, Y, X) samples)."""
    generate_demo_dataset(work / "demo", DemoSpec(patients=2, studies_per_patient=1, xray_per_study=4,
                                                  png_per_study=12, ct_size=512, ct_slices=16))
    series = sorted((work / "demo" / "ct").rglob("*.dcm"))
    ct = np.stack([_dicom_pixels(p).astype(np.int16) for p in series[:16]])[None]
    pngs = np.stack([iio.imread(p) for p in sorted((work / "demo" / "png").rglob("*.png"))])[:, None]
    xrays = np.stack([_dicom_pixels(p) for p in sorted((work / "demo" / "xray").rglob("*.dcm"))])[:, None]
    cr = _dicom_pixels(get_testdata_file("RG1_UNCI.dcm"))[None]
    real_slice = _dicom_pixels(get_testdata_file("693_UNCR.dcm"))[None]
    samples = _training_samples([(im, "OT") for im in pngs] + [(im, "DX") for im in (*xrays, cr)]
                                + [(sl[None], "CT") for sl in (*ct[0], real_slice[0])])
    mask = (ct[:, :8] > 0).astype(np.uint8)
    return {
        "CT int16 512 demo (16 sl)": ("archive", ct),
        "CT int16 512 real slice": ("archive", real_slice),
        "PNG uint8 128 demo": ("archive", pngs),
        "PNG uint8 512 camera": ("archive", skimage.data.camera()[None]),
        "PNG RGB uint8 astronaut": ("archive", np.moveaxis(skimage.data.astronaut(), -1, 0).copy()),
        f"X-ray uint16 {xrays.shape[-1]} demo": ("archive", xrays),
        "X-ray uint16 CR real": ("archive", cr),
        "mask uint8 (CT body)": ("archive_mask", mask),
        "training float32": ("training_images", samples),
        "training float16": ("training_images", samples.astype(np.float16)),
    }


def _training_samples(images: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """(N, 1, 64, 64) float32 samples made as ingest makes them (medpipe.preprocess, default 2D config)."""
    config = PreprocessConfig()
    return np.stack([to_training_sample(im, (1.0, 1.0), modality, config)[0] for im, modality in images])


def _timed(fn: Callable[[], object], min_seconds: float) -> tuple[float, object]:
    """Best seconds per call over repeats lasting at least min_seconds (at most 20 calls), and the result."""
    best, total, calls, result = float("inf"), 0.0, 0, None
    while calls < 20 and (calls < 2 or total < min_seconds):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        best, total, calls = min(best, dt), total + dt, calls + 1
    return best, result


def measure(data: dict[str, tuple[str, np.ndarray]], min_seconds: float) -> list[tuple[str, str, float, float, float]]:
    """(dataset, codec, write MB/s, read MB/s, stored/raw) for every accepted candidate; asserts round-trips."""
    rows = []
    for name, (_, array) in data.items():
        for cand in candidates():
            if not cand.accepts(array):
                continue
            t_enc, coded = _timed(partial(cand.encode, array), min_seconds)
            assert isinstance(coded, bytes)
            t_dec, back = _timed(partial(cand.decode, coded, array), min_seconds)
            assert isinstance(back, np.ndarray) and back.dtype == array.dtype
            assert np.array_equal(back, array), f"{cand.name} is not lossless on {name}"
            mb = array.nbytes / 1e6
            rows.append((name, cand.name, mb / t_enc, mb / t_dec, len(coded) / array.nbytes))
    return rows


def archive_overhead(pngs: list[Path], config: StoreConfig, work: Path) -> dict[str, float]:
    """Mean bytes per demo PNG archived with write_archive_image: chunk bytes, zarr.json bytes, PNG file bytes."""
    root = zarr.open_group(work / f"archive-{config.archive_codec}.zarr", mode="w")
    for i, path in enumerate(pngs):
        write_archive_image(root, f"u{i}", iio.imread(path)[None], (1.0, 1.0), config)
    files = [p for p in (work / f"archive-{config.archive_codec}.zarr" / "archive").rglob("*") if p.is_file()]
    meta = sum(p.stat().st_size for p in files if p.name == "zarr.json")
    chunks = sum(p.stat().st_size for p in files if p.name != "zarr.json")
    n = len(pngs)
    return {"chunk": chunks / n, "json": meta / n, "png": sum(p.stat().st_size for p in pngs) / n}


def store_2d_proxy(source: Path, config: StoreConfig, work: Path) -> tuple[int, int, int]:
    """Bytes of the demo's PNG + X-ray files, and of their archive and default 2D training arrays (64x64) written
    with `config`: the two layers that make up a 2D store's size (no sample table, reports or medpipe attrs)."""
    files = sorted([*(source / "png").rglob("*.png"), *(source / "xray").rglob("*.dcm")])
    url = work / f"proxy-{config.archive_codec}-{config.training_dtype}.zarr"
    root = zarr.open_group(url, mode="w")
    samples = []
    for i, path in enumerate(files):
        pixels, modality = (iio.imread(path), "OT") if path.suffix == ".png" else (_dicom_pixels(path), "DX")
        write_archive_image(root, f"u{i}", pixels[None], (1.0, 1.0), config)
        samples.append(to_training_sample(pixels[None], (1.0, 1.0), modality, PreprocessConfig())[0])
    create_training_arrays(root, len(samples), samples[0].shape, False, config)
    root["training/images"][...] = np.stack(samples)

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), size(url / "archive"), size(url / "training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-seconds", type=float, default=0.05, help="timing repeats last at least this long")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = datasets(work)
        print("| data | layer | raw MB | codec | write MB/s | read MB/s | stored/raw |")
        print("|---|---|---:|---|---:|---:|---:|")
        for name, codec, w, r, ratio in measure(data, args.min_seconds):
            layer, array = data[name]
            print(f"| {name} | {layer} | {array.nbytes / 1e6:.2f} | {codec} | {w:.0f} | {r:.0f} | {ratio:.3f} |")
        pngs = sorted((work / "demo" / "png").rglob("*.png"))
        print("\nArchive of the demo PNGs (write_archive_image), mean bytes per image:")
        print("| archive_codec | chunk | zarr.json (group + array) | total | PNG file | total / PNG |")
        print("|---|---:|---:|---:|---:|---:|")
        for codec in ("auto", "zstd"):
            o = archive_overhead(pngs, StoreConfig(archive_codec=codec, archive_level=1), work)
            total = o["chunk"] + o["json"]
            print(f"| {codec} | {o['chunk']:.0f} | {o['json']:.0f} | {total:.0f} | {o['png']:.0f} | "
                  f"{total / o['png']:.3f} |")
        print("\nDemo 2D source (PNG + X-ray DICOM files) vs its archive + training arrays:")
        print("| archive_codec | training_dtype | source MB | archive MB | training MB | store / source |")
        print("|---|---|---:|---:|---:|---:|")
        for codec, dtype in (("zstd", "float32"), ("auto", "float32"), ("auto", "float16")):
            config = StoreConfig(archive_codec=codec, archive_level=1, training_dtype=dtype)
            src, arch, train = store_2d_proxy(work / "demo", config, work)
            print(f"| {codec} | {dtype} | {src / 1e6:.2f} | {arch / 1e6:.2f} | {train / 1e6:.2f} | "
                  f"{(arch + train) / src:.3f} |")


if __name__ == "__main__":
    main()
