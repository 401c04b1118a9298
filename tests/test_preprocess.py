"""medpipe.preprocess's spatial operations against MONAI's own transforms (the oracle): the ingest reproduces
`Resize` and `ResizeWithPadOrCrop` without importing MONAI (see the module docstring), and must give the very same
arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.data import set_track_meta
from monai.transforms import Resize, ResizeWithPadOrCrop

from medpipe.preprocess import pad_or_crop, resize

RNG = np.random.default_rng(11)
SHAPES = [(1, 37, 52), (3, 64, 64), (1, 9, 20, 31), (2, 16, 16, 16)]


def _monai(transform, x: np.ndarray) -> np.ndarray:
    set_track_meta(False)
    out = transform(x)
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["area", "nearest", "linear"])
def test_resize_is_monais_resize(shape: tuple[int, ...], mode: str) -> None:
    x = RNG.normal(size=shape).astype(np.float32)
    spatial = len(shape) - 1
    torch_mode = {"linear": "bilinear" if spatial == 2 else "trilinear"}.get(mode, mode)
    for size in ((7,) * spatial, tuple(n * 2 + 1 for n in shape[1:]), tuple(shape[1:]),
                 tuple(max(1, n // 3) for n in shape[1:])):
        ours = resize(x, size, torch_mode)
        theirs = _monai(Resize(size, mode=torch_mode), x)
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (shape[0], *size)
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_pad_or_crop_is_monais_resize_with_pad_or_crop(shape: tuple[int, ...], mode: str) -> None:
    x = RNG.normal(size=shape).astype(np.float32)
    spatial = shape[1:]
    sizes = [tuple(n + d for n in spatial) for d in (-5, -4, -1, 0, 1, 2, 7)]
    sizes.append(tuple(n + (3 if k % 2 else -3) for k, n in enumerate(spatial)))  # crop one axis, pad another
    for size in sizes:
        ours = pad_or_crop(x, size, mode)
        theirs = _monai(ResizeWithPadOrCrop(size, mode=mode), x)
        assert ours.shape == theirs.shape == (shape[0], *size), size
        np.testing.assert_array_equal(ours, theirs)


def test_ingest_processes_do_not_import_monai() -> None:
    """The reason these are written here: a Dask worker running ingest tasks stays ~240 MB smaller."""
    code = ("import sys, tasks.ingest, medpipe.ingest.shard, medpipe.ingest.training, medpipe.ingest.volume_cases; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"
