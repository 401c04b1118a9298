"""GAN augmentation: DiffAugment ops, networks, train_gan (outputs, train-split-only reads, resume), generate
(shape, range, determinism) and the one-line errors for bad stores and mismatched checkpoints."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
import zarr

from medpipe.errors import UserError
from medpipe.gan import GanCheckpointError, GanInputError, GanMismatchError
from medpipe.gan.config import GanConfig
from medpipe.gan.data import TrainRows
from medpipe.gan.diffaugment import cutout, diff_augment, translation
from medpipe.gan.models import MinibatchStdDev, ProjectionDiscriminator, build_discriminator, build_generator
from medpipe.gan.train import check_generator_matches_store, generate, load_generator, train_gan
from medpipe.store import ATTRS_KEY
from medpipe.training import CheckpointExistsError
from training_store import SENTINEL, make_2d_store, make_3d_store, synthetic_2d, write_store

TINY = dict(latent_dim=8, width=4, batch_size=16, device="cpu", seed=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these networks are tiny, and on a shared 2-core machine two OpenMP threads spinning
    against other processes made a 2-epoch run 25x slower (20 s instead of 0.8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> GanConfig:
    return GanConfig(**{**TINY, "epochs": 2, **overrides})


def sentinel_store(url: str, n: int = 96, size: int = 16, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """A 16x16 store whose val/test images and a few unlabelled train images are all SENTINEL."""
    images, labels = synthetic_2d(n, size, seed)
    split = np.random.default_rng(seed + 1).choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.int8)
    unlabelled = np.flatnonzero(split == 0)[:4]
    labels[unlabelled] = -1
    images[(split != 0) | (labels < 0)] = SENTINEL
    return write_store(url, images, labels, split=split, seed=seed), split, labels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run on the sentinel store, recording every image batch D's forward receives and the callbacks."""
    base = tmp_path_factory.mktemp("gan")
    url, split, labels = sentinel_store(str(base / "store.zarr"))
    seen: list[float] = []
    calls: list[tuple[int, dict[str, float]]] = []
    forward = ProjectionDiscriminator.forward

    def recording(self, x, y):
        seen.append(float(x.detach().abs().max()))
        return forward(self, x, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProjectionDiscriminator, "forward", recording)
        result = train_gan(url, base / "run", tiny(), on_epoch_end=lambda e, m: calls.append((e, m)))
    return {"url": url, "split": split, "labels": labels, "result": result, "seen": seen, "calls": calls,
            "base": base}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and isinstance(exc.value, UserError)
    return message


# -- DiffAugment and networks ----------------------------------------------------------------------------------------
def test_diffaugment_ops_are_differentiable_and_keep_shape():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16, requires_grad=True)
    for policy in ("translation", "cutout", "color", "brightness,contrast", "translation,cutout"):
        y = diff_augment(x, policy)
        assert y.shape == x.shape
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(diff_augment(x, "none"), x) and torch.equal(diff_augment(x, ""), x)
    ones = torch.ones(64, 1, 16, 16)
    # half of each side, centred anywhere (clipped at the edges): 0.18 of the image on average at 16 px
    assert math.isclose(float((cutout(ones) == 0).float().mean()), 0.18, abs_tol=0.04)
    shifted = translation(torch.arange(16.0).repeat(1, 1, 16, 1))  # columns 0..15, moved by up to 2 px, 0-filled
    assert set(torch.unique(shifted).tolist()) <= set(range(16))
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        GanConfig(diffaugment="translation,rotate")


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 64), (1, 128, 32)])
def test_networks_fit_supported_shapes(shape):
    spec = {"latent_dim": 8, "num_classes": 3, "sample_shape": list(shape), "width": 4}
    g, d = build_generator(spec), build_discriminator(spec, "translation,cutout")
    x = g(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert x.shape == (5, *shape) and float(x.detach().abs().max()) <= 1.0
    assert d(x, torch.tensor([0, 1, 2, 0, 1])).shape == (5,)
    d.eval()  # no augmentation outside training: the same input gives the same logits
    assert torch.equal(d(x, torch.zeros(5, dtype=torch.long)), d(x, torch.zeros(5, dtype=torch.long)))


def test_minibatch_stddev_channel():
    mbstd = MinibatchStdDev()
    same = mbstd(torch.ones(6, 2, 4, 4))  # groups of 3 (6 is not divisible by 4) of identical images: std ~ 0
    assert same.shape == (6, 3, 4, 4) and float(same[:, 2].max()) < 1e-3
    x = torch.randn(8, 2, 4, 4)
    varied = mbstd(x)
    assert float(varied[:, 2].min()) > 0.3 and torch.equal(varied[:, :2], x)


# -- training --------------------------------------------------------------------------------------------------------
def test_short_run_writes_checkpoint_metrics_and_grids(run):
    result, out = run["result"], run["result"].out_dir
    assert result.epochs_completed == 2 and result.last_path == out / "last.pt" and result.last_path.is_file()
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "r1", "images_per_s"):
            assert math.isfinite(float(row[key])), key
    assert sorted(p.name for p in result.samples_dir.glob("*.png")) == ["epoch_001.png", "epoch_002.png"]
    assert any((out / "tb").iterdir())
    assert [e for e, _ in run["calls"]] == [1, 2] and "loss_g" in run["calls"][0][1]
    meta = load_generator(result.last_path)[1]
    assert meta["classes"] == ["none", "lesion"] and meta["sample_shape"] == [1, 16, 16]
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temporary files"


def test_only_labelled_train_samples_are_read(run):
    """Val/test and unlabelled train images hold SENTINEL: neither the intensity range nor any image D sees has it."""
    assert run["result"].intensity["max"] <= 1.0 and run["result"].intensity["min"] >= 0.0
    assert run["seen"] and max(run["seen"]) <= 1.0 + 1e-5
    rows = TrainRows((run["split"] == 0) & (run["labels"] >= 0))
    rows.check(np.flatnonzero(rows.allowed))
    for forbidden in (np.flatnonzero(run["split"] == 1)[:1], np.flatnonzero(run["labels"] < 0)[:1]):
        with pytest.raises(RuntimeError, match="outside the labelled train split"):
            rows.check(forbidden)


def test_generate_matches_store_and_is_deterministic(run):
    path = run["result"].last_path
    images, labels = generate(path, 5, seed=7)
    assert images.shape == (10, 1, 16, 16) and images.dtype == np.float32 and labels.dtype == np.int64
    assert labels.tolist() == [0] * 5 + [1] * 5
    lo, hi = run["result"].intensity["min"], run["result"].intensity["max"]
    assert images.min() >= lo and images.max() <= hi and np.isfinite(images).all()
    again, labels_again = generate(path, 5, seed=7)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(images, generate(path, 5, seed=8)[0])
    assert np.array_equal(generate(path, 2, seed=7)[0][:2], images[:2]), "a sample does not depend on the count"
    assert generate(path, 0, seed=7)[0].shape == (0, 1, 16, 16)


def test_resume_continues_from_the_saved_epoch(run, tmp_path):
    straight = train_gan(run["url"], tmp_path / "straight", tiny(epochs=3))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run["result"].out_dir, resumed_dir)
    epochs_seen: list[int] = []
    resumed = train_gan(run["url"], resumed_dir, tiny(epochs=3), resume=True,
                        on_epoch_end=lambda e, m: epochs_seen.append(e))
    assert epochs_seen == [3] and resumed.epochs_completed == 3
    for a, b in zip(straight.history, resumed.history):
        assert [a[k] for k in ("loss_d", "loss_g")] == pytest.approx([b[k] for k in ("loss_d", "loss_g")], rel=1e-5)
    g_straight, g_resumed = load_generator(straight.last_path)[0], load_generator(resumed.last_path)[0]
    for p, q in zip(g_straight.parameters(), g_resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert (resumed_dir / "samples" / "epoch_003.png").is_file()
    with pytest.raises(CheckpointExistsError):
        train_gan(run["url"], resumed_dir, tiny(epochs=3))
    with pytest.raises(GanMismatchError, match="different config") as exc:
        train_gan(run["url"], resumed_dir, tiny(epochs=4, latent_dim=16), resume=True)
    one_line(exc)


# -- mismatches and bad input ---------------------------------------------------------------------------------------
def test_checkpoint_store_mismatch_is_one_line(run, tmp_path):
    path = run["result"].last_path
    meta = load_generator(path, store_url=run["url"])[1]  # its own store: fine
    other = make_2d_store(str(tmp_path / "other.zarr"), n=64, size=16, seed=5)
    bigger = make_2d_store(str(tmp_path / "bigger.zarr"), n=64, size=32)
    renamed = make_2d_store(str(tmp_path / "renamed.zarr"), n=64, size=16, classes=["normal", "nodule"])
    for url, what in ((other, "content hash"), (bigger, "sample_shape"), (renamed, "classes")):
        with pytest.raises(GanMismatchError, match=what) as exc:
            check_generator_matches_store(meta, url)
        one_line(exc)
    with pytest.raises(GanMismatchError):
        load_generator(path, store_url=other)
    resumed = tmp_path / "resume-other"
    shutil.copytree(run["result"].out_dir, resumed)
    with pytest.raises(GanMismatchError, match="content hash"):
        train_gan(other, resumed, tiny(epochs=3), resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for bad in (tmp_path / "junk.pt", tmp_path / "missing.pt"):
        with pytest.raises(GanCheckpointError) as exc:
            generate(bad, 1, seed=0)
        one_line(exc)


def _unlabelled(url: str) -> str:
    images, labels = synthetic_2d(40, 16)
    return write_store(url, images, np.full_like(labels, -1))


def _rare_class(url: str) -> str:
    images, labels = synthetic_2d(60, 16)
    split = np.zeros(60, dtype=np.int8)
    labels[:] = 0
    labels[:3] = 1
    return write_store(url, images, labels, split=split)


def _volumes_layout(url: str) -> str:
    make_2d_store(url, n=40, size=16)
    root = zarr.open_group(url, mode="r+")
    root.attrs[ATTRS_KEY] = {**dict(root.attrs[ATTRS_KEY]), "layout": "volumes"}
    return url


def _incomplete(url: str) -> str:
    return make_2d_store(url, n=40, size=16, complete=False)


@pytest.mark.parametrize("make, message", [
    (_unlabelled, "no labelled samples in the train split"),
    (_rare_class, r"at least 8 labelled train samples per class .*'lesion' \(3\)"),
    (lambda url: make_3d_store(url, n=8, shape=(4, 16, 16)), "2D stores of the fixed layout"),
    (_volumes_layout, "layout 'volumes'"),
    (lambda url: make_2d_store(url, n=40, size=24), "powers of two"),
    (_incomplete, "not a complete medpipe store"),
])
def test_bad_stores_raise_one_line_errors(tmp_path, make, message):
    url = make(str(tmp_path / "bad.zarr"))
    with pytest.raises(GanInputError, match=message) as exc:
        train_gan(url, tmp_path / "run", tiny(epochs=1))
    one_line(exc)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.gpu
def test_gpu_bf16_run_and_generate(run, tmp_path):
    result = train_gan(run["url"], tmp_path / "gpu", tiny(device="cuda", amp="auto"))
    assert result.device.startswith("cuda") and all(math.isfinite(r["loss_d"]) for r in result.history)
    images, _ = generate(result.last_path, 4, seed=1, device="cuda")
    again, _ = generate(result.last_path, 4, seed=1, device="cuda")
    assert np.array_equal(images, again) and images.min() >= result.intensity["min"]
