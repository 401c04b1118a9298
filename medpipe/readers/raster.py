"""Read PNG / JPEG (Pillow) and TIFF (tifffile) through fsspec into a channel-first :class:`DecodedImage`.

Pillow is used directly rather than through imageio so that image modes are handled explicitly:
grayscale stays 1 channel in its native dtype (16-bit stays uint16), RGB(A) and palette images
become 3-channel RGB (alpha dropped). Multi-page TIFF stacks become (C, Z, Y, X) volumes.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import fsspec
import numpy as np
import tifffile
from PIL import Image

from .base import (
    DecodedImage,
    QuarantineReason,
    UnreadableFile,
    check_image_bytes,
    finite_image,
    infrastructure_guard,
    raise_if_infrastructure,
)

_TIFF_SUFFIXES = (".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_DEPTH_AXES = "ZIQT"  # tifffile axis letters that can serve as the stacking axis


def _fail(detail: str) -> UnreadableFile:
    return UnreadableFile(QuarantineReason.unreadable_image, detail)


def _is_tiff(path: str) -> bool:
    return path.lower().endswith(_TIFF_SUFFIXES)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Pillow image -> (Y, X, C) array with C in {1, 3}, native dtype for grayscale."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode not in _GRAY_MODES and mode not in ("RGB", "RGBA", "RGBa"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV ...
    arr = np.asarray(img)
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
        arr = arr.astype(np.uint16)  # Pillow widens some 16-bit inputs to int32 mode "I"
    if arr.ndim == 2:
        return arr[:, :, None]
    return arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]  # drop alpha


def _tiff_plan(axes: str, shape: tuple[int, ...]) -> tuple[str, str | None, str | None]:
    """Validate TIFF series axes: return (squeezed axes, channel axis, depth axis)."""
    kept = "".join(a for a, n in zip(axes, shape) if n > 1 or a in "YX")
    extra = [a for a in kept if a not in "YX"]
    channel = next((a for a in extra if a in "SC"), None)
    depth = [a for a in extra if a != channel]
    if len(depth) > 1 or (depth and depth[0] not in _DEPTH_AXES) or "Y" not in kept or "X" not in kept:
        raise _fail(f"unsupported TIFF axes {axes}")
    return kept, channel, depth[0] if depth else None


def _tiff_channels(axis: str | None, n: int) -> int:
    """Samples kept: 'S' is interleaved colour (RGBA -> RGB, gray+alpha -> gray); 'C' keeps all."""
    if axis is None:
        return 1
    if axis == "S":
        return 3 if n >= 3 else 1
    return n


def _read_tiff(f: BinaryIO) -> np.ndarray:
    """TIFF -> (C, Z, Y, X) or (C, Y, X)."""
    with tifffile.TiffFile(f) as tif:
        series = tif.series[0]
        page = series.keyframe  # the first page as a TiffPage (pages[0] may be typed TiffFrame | None)
        arr = series.asarray()
        axes, shape = series.axes, series.shape
        kept, channel, depth = _tiff_plan(axes, shape)
        arr = arr.reshape([n for a, n in zip(axes, shape) if n > 1 or a in "YX"])
        photometric = page.photometric
        colormap = page.colormap
    if photometric == tifffile.PHOTOMETRIC.PALETTE and colormap is not None and channel is None:
        # tifffile returns palette indices; map them by hand (no helper in current tifffile)
        arr, kept, channel = np.moveaxis(colormap[:, arr], 0, -1), kept + "S", "S"
    order = ([channel] if channel else []) + ([depth] if depth else []) + ["Y", "X"]
    arr = np.transpose(arr, [kept.index(a) for a in order])
    if channel is None:
        arr = arr[None]
    arr = arr[: _tiff_channels(channel, arr.shape[0])]
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE and arr.dtype.kind == "u":
        arr = np.iinfo(arr.dtype).max - arr  # white-is-zero -> usual black-is-zero convention
    return np.ascontiguousarray(arr)


def _pil_band_bytes(mode: str) -> int:
    if mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        return 4
    return 2 if mode.startswith("I;16") else 1


def raster_header_facts(f: BinaryIO, path: str) -> tuple[int, int, int, int, int]:
    """Header-only look at an open raster file: (rows, columns, frames, channels, decoded bytes).

    Decoded bytes is what decoding allocates: TIFF series shape x dtype size (x3 uint16 for palette images),
    Pillow width x height x bands x bytes per band (palette images become RGB). Pillow's own decompression-bomb
    refusal (over twice ``Image.MAX_IMAGE_PIXELS``) is reported as ``too_large`` too.
    """
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(f) as tif:
                series = tif.series[0]
                kept, channel, depth = _tiff_plan(series.axes, series.shape)
                sizes = dict(zip(series.axes, series.shape))
                photometric = series.keyframe.photometric
                voxels = int(np.prod(series.shape, dtype=object))
                nbytes = voxels * np.dtype(series.dtype).itemsize
            palette = photometric == tifffile.PHOTOMETRIC.PALETTE
            channels = _tiff_channels(channel, sizes[channel]) if channel else (3 if palette else 1)
            if palette and channel is None:
                nbytes = max(nbytes, voxels * 3 * 2)
            return sizes["Y"], sizes["X"], sizes[depth] if depth else 1, channels, nbytes
        with Image.open(f) as img:
            columns, rows = img.size
            channels = 1 if img.mode in _GRAY_MODES else 3
            bands = max(len(img.getbands()), 3 if img.mode in ("P", "PA") else 1)
            nbytes = rows * columns * bands * _pil_band_bytes(img.mode)
        return rows, columns, 1, channels, nbytes
    except UnreadableFile:
        raise
    except Image.DecompressionBombError:
        raise _bomb() from None
    except Exception as exc:  # noqa: BLE001 - Pillow/tifffile raise many types on garbage
        raise_if_infrastructure(exc)
        raise _fail(f"cannot parse image header ({type(exc).__name__})") from None


def raster_header_shape(f: BinaryIO, path: str) -> tuple[int, int, int, int]:
    """Header-only look at an open raster file: (rows, columns, frames, channels)."""
    return raster_header_facts(f, path)[:4]


def check_raster_size(facts: tuple[int, int, int, int, int], max_image_bytes: int | None) -> None:
    """Raise ``too_large`` when the decoded bytes of :func:`raster_header_facts` exceed ``max_image_bytes``."""
    rows, columns, frames, _, nbytes = facts
    check_image_bytes(columns, rows, frames, nbytes, max_image_bytes)


def _bomb() -> UnreadableFile:
    return UnreadableFile(QuarantineReason.too_large, "over Pillow's decompression-bomb pixel limit")


@infrastructure_guard
def read_raster(path: str, fs: fsspec.AbstractFileSystem, max_image_bytes: int | None = None) -> DecodedImage:
    """Decode PNG/JPEG/TIFF: 2D -> (C, Y, X) with spacing (1.0, 1.0); TIFF stacks -> (C, Z, Y, X).

    ``max_image_bytes``: the header is checked first (``too_large``, :func:`raster_header_facts`). Float
    pixels (TIFF, Pillow mode F) follow :func:`medpipe.readers.base.finite_pixels`.
    """
    with fs.open(path, "rb") as f:
        data = f.read()
    if max_image_bytes is not None:
        check_raster_size(raster_header_facts(io.BytesIO(data), path), max_image_bytes)
    try:
        if _is_tiff(path):
            pixels = _read_tiff(io.BytesIO(data))
        else:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                pixels = np.ascontiguousarray(np.moveaxis(_pil_to_array(img), -1, 0))
    except UnreadableFile:
        raise
    except Image.DecompressionBombError:
        raise _bomb() from None
    except Exception as exc:  # noqa: BLE001 - Pillow/tifffile errors vary (UnidentifiedImageError, OSError...)
        raise_if_infrastructure(exc)
        raise _fail(f"cannot decode image ({type(exc).__name__})") from None
    if pixels.size == 0:
        raise _fail("empty image")
    spacing = (1.0,) * (pixels.ndim - 1)
    return finite_image(DecodedImage(pixels=pixels, spacing=spacing, modality="OT", header=None))
