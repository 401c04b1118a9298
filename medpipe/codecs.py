"""Codec choice per store layer, measured by benchmarks/codecs.py (results in docs/benchmarks.md).

Layers and what "auto" picks (all lossless):
    archive          integer images of <= 16 bits: JPEG-LS, frame by frame (medpipe.jpegls, below);
                     other dtypes (float32 NIfTI, int32): Blosc zstd, byte shuffle, `archive_level`
    archive_mask     Blosc zstd, bit shuffle (beats JPEG-LS on label maps and is ~10x faster)
    training_images  Blosc `codec`/`level`, byte shuffle, in `training_dtype` (float32 or float16); uint8: float32
                     arrays packed to 8-bit steps of 1/255 by numcodecs' FixedScaleOffset, then Blosc with bit
                     shuffle (`training_images_chain`)
    training_masks   Blosc `codec`/`level`, bit shuffle
    volume_image     as training_images; integer images (CT in HU) in JPEG-LS with `volume_codec: jpegls`
    volume_mask      as training_masks

`codec_chain(layer, config, dtype)` returns the keyword arguments of zarr's `create_array` (serializer and
compressors). JPEG-LS is not a zarr v3 core codec: importing this module (medpipe.store does) registers
`medpipe.jpegls` with zarr, so any process that imports medpipe.store reads such stores with plain zarr-python.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import imagecodecs
import numpy as np
import zarr
import zarr.codecs as zc
import numcodecs
from zarr.codecs.numcodecs import FixedScaleOffset
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.errors import ZarrUserWarning
from zarr.registry import register_codec

from medpipe.config import StoreConfig
from medpipe.errors import UserError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

Layer = Literal["archive", "archive_mask", "training_images", "training_masks", "volume_image", "volume_mask"]
LAYERS: tuple[str, ...] = get_args(Layer)
JPEGLS_NAME = "medpipe.jpegls"
_HEADER = struct.Struct("<I")  # frame count, then one uint32 length per frame, then the JPEG-LS frames


class CodecError(UserError, ValueError):
    """A layer or dtype that no configured codec stores."""


def jpegls_supports(dtype: np.dtype[Any] | str | type) -> bool:
    """Whether JPEG-LS stores this dtype losslessly: integers of 8 or 16 bits (signed ones offset to unsigned)."""
    dt = np.dtype(dtype)
    return dt.kind in "iu" and dt.itemsize in (1, 2)


def _unsigned(dt: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(f"<u{dt.itemsize}")


def _sign_bit(dt: np.dtype[Any]) -> int:
    return 1 << (8 * dt.itemsize - 1)


def encode_frames(array: np.ndarray) -> bytes:
    """JPEG-LS bytes of an integer array of shape (..., Y, X): each 2D frame coded on its own (lossless)."""
    dt = array.dtype
    if not jpegls_supports(dt):
        raise ValueError(f"JPEG-LS stores 8- and 16-bit integers, not {dt}")
    frames = np.ascontiguousarray(array).reshape(-1, *array.shape[-2:]).astype(dt.newbyteorder("<"), copy=False)
    if dt.kind == "i":  # two's complement -> offset binary: a bijection, so still lossless
        frames = frames.view(_unsigned(dt)) ^ _unsigned(dt).type(_sign_bit(dt))
    coded = [imagecodecs.jpegls_encode(np.ascontiguousarray(f)) for f in frames]
    lengths = struct.pack(f"<{len(coded)}I", *map(len, coded))
    return _HEADER.pack(len(coded)) + lengths + b"".join(coded)


def decode_frames(data: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `encode_frames`: the array of `dtype` and `shape`."""
    dt = np.dtype(dtype)
    (count,) = _HEADER.unpack_from(data, 0)
    lengths = struct.unpack_from(f"<{count}I", data, _HEADER.size)
    out = np.empty((count, *shape[-2:]), _unsigned(dt))
    pos = _HEADER.size + 4 * count
    for i, n in enumerate(lengths):
        out[i] = imagecodecs.jpegls_decode(data[pos : pos + n])
        pos += n
    if dt.kind == "i":
        out ^= _unsigned(dt).type(_sign_bit(dt))
    return out.view(dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)


@dataclass(frozen=True)
class JpegLsCodec(ArrayBytesCodec):
    """Zarr v3 array-to-bytes codec `medpipe.jpegls`: lossless JPEG-LS (CharLS via imagecodecs) per 2D frame."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        parse_named_configuration(data, JPEGLS_NAME, require_configuration=False)
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": JPEGLS_NAME}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        native = dtype.to_native_dtype()
        if not jpegls_supports(native) or len(shape) < 2:
            raise ValueError(f"{JPEGLS_NAME} codes 2D frames of 8/16-bit integers, not {native} {shape}")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        array = decode_frames(chunk_bytes.to_bytes(), chunk_spec.dtype.to_native_dtype(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(array)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return chunk_spec.prototype.buffer.from_bytes(encode_frames(chunk_array.as_numpy_array()))

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG-LS output size depends on the data")


register_codec(JPEGLS_NAME, JpegLsCodec)


def blosc(cname: Literal["zstd", "lz4"], level: int) -> zc.BloscCodec:
    """A Blosc codec whose shuffle and typesize zarr sets from each array's dtype: byte shuffle for 16/32-bit
    data, bit shuffle for 8-bit images and masks, the measured best of the two for each."""
    return zc.BloscCodec(cname=cname, clevel=level)


def _blosc_chain(codec: str, level: int, bytes_8bit: bool = False) -> tuple[Any, ...]:
    """The compressors of `codec` ("none": none). `bytes_8bit`: the bytes reaching Blosc are 8-bit values whatever
    the array's dtype (after a packing filter), so bit shuffle and typesize 1 are set here, not by zarr."""
    if codec == "none":
        return ()
    cname: Literal["zstd", "lz4"] = "lz4" if codec == "lz4" else "zstd"
    if bytes_8bit:
        return (zc.BloscCodec(cname=cname, clevel=level, shuffle="bitshuffle", typesize=1),)
    return (blosc(cname, level),)


# zarr skips a chunk that equals the fill value, and tests every chunk for it with np.array_equal(equal_nan=True)
# against the broadcast fill: ~25 ms per 10 MB chunk, 3-4x the Blosc encode of the same chunk (a CT series' mask
# took 31 ms to write instead of 7). Ingest chunks are rarely empty and an empty one compresses to a few dozen bytes,
# so every array medpipe writes stores all its chunks (docs/benchmarks.md).
WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def codec_chain(layer: Layer, config: StoreConfig, dtype: np.dtype[Any] | str | type) -> dict[str, Any]:
    """Keyword arguments of zarr `create_array` (serializer, compressors, write config) for an array of `layer` and
    `dtype`."""
    if layer not in LAYERS:
        raise CodecError(f"unknown store layer {layer!r}; layers: {', '.join(LAYERS)}")
    dt = np.dtype(dtype)
    if layer.startswith("archive"):
        choice = config.archive_codec
        if choice == "jpegls" and not jpegls_supports(dt):
            raise CodecError(f"archive_codec jpegls stores 8- and 16-bit integer images, not {dt}")
        if choice == "jpegls" or (choice == "auto" and layer == "archive" and jpegls_supports(dt)):
            return {"serializer": JpegLsCodec(), "compressors": (), "config": WRITE_CONFIG}
        codec = "zstd" if choice == "auto" else choice
        return {"serializer": "auto", "compressors": _blosc_chain(codec, config.archive_level), "config": WRITE_CONFIG}
    if layer == "volume_image" and config.volume_codec == "jpegls" and jpegls_supports(dt):
        return {"serializer": JpegLsCodec(), "compressors": (), "config": WRITE_CONFIG}
    return {"serializer": "auto", "compressors": _blosc_chain(config.codec, config.level), "config": WRITE_CONFIG}


# training_dtype uint8: intensities scaled to 0..1 are stored as round(255 x), uint8, and read back as k / 255 in
# float32 by zarr itself (numcodecs' FixedScaleOffset; every reader gets float32 without knowing). The error is at
# most 1/510: half a grey level of an 8-bit source.
UINT8_SCALE = 255
UINT8_RANGE = (0.0, 1.0)
# numcodecs codecs are not in the zarr v3 spec, and zarr says so each time it opens such an array (every DataLoader
# worker, every read); they are read by any zarr-python with numcodecs, which is what medpipe stores promise.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification",
                        category=ZarrUserWarning)


class PackingError(ValueError):
    """Values that a packed (uint8) training array cannot hold: they would wrap around."""


def training_images_chain(config: StoreConfig) -> tuple[np.dtype[Any], dict[str, Any]]:
    """(dtype of the training/images array, zarr `create_array` keyword arguments). A packed (uint8) array's dtype
    is float32: its chunks are sized as float32 ones, since a reader holds them decoded (the loader's chunk cache)."""
    if config.training_dtype != "uint8":
        dt = np.dtype(config.training_dtype)
        return dt, codec_chain("training_images", config, dt)
    packing = FixedScaleOffset(offset=0, scale=UINT8_SCALE, dtype="<f4", astype="u1")
    compressors = _blosc_chain(config.codec, config.level, bytes_8bit=True)
    return np.dtype(np.float32), {"filters": (packing,), "serializer": "auto", "compressors": compressors,
                                  "config": WRITE_CONFIG}


def as_stored(array: zarr.Array, values: np.ndarray) -> np.ndarray:
    """`values` as `array` will hold them once written: cast to its dtype, and through its FixedScaleOffset packing
    when it has one (raises PackingError for values outside what the packing holds, instead of a silent wrap)."""
    values = values.astype(array.dtype, copy=False)
    packing = [f for f in array.filters if isinstance(f, FixedScaleOffset)]
    if not packing or values.size == 0:
        return values
    codec = numcodecs.get_codec(dict(packing[0].codec_config))
    info = np.iinfo(np.dtype(codec.astype))
    lo, hi = (info.min - 0.5) / codec.scale + codec.offset, (info.max + 0.5) / codec.scale + codec.offset
    if not (np.all(np.isfinite(values)) and float(values.min()) >= lo and float(values.max()) < hi):
        raise PackingError(f"training_dtype uint8 holds intensities in {UINT8_RANGE[0]:g}..{UINT8_RANGE[1]:g}; "
                           f"these span {float(np.nanmin(values)):.3g}..{float(np.nanmax(values)):.3g}")
    return np.asarray(codec.decode(codec.encode(values)), dtype=array.dtype).reshape(values.shape)


def for_writing(array: zarr.Array) -> zarr.Array:
    """`array` (opened from the store) with the write config `codec_chain` gives new arrays."""
    return array.with_config(WRITE_CONFIG)


__all__ = ["JPEGLS_NAME", "LAYERS", "UINT8_RANGE", "UINT8_SCALE", "CodecError", "JpegLsCodec", "Layer", "PackingError",
           "WRITE_CONFIG", "as_stored", "blosc", "codec_chain", "decode_frames", "encode_frames", "for_writing",
           "jpegls_supports", "training_images_chain"]
