"""From a GAN checkpoint to images: reading and checking the checkpoint, `generate`, and the per-epoch grid.

The networks work in a model space [-1, 1]; a store's images are in data units (0..1 for DX/OT, z-scores for
CT/MR; `medpipe.preprocess.normalize`). The map between them is the affine one that sends the train split's
[min, max] (recorded in the checkpoint as "intensity") onto [-1, 1], so generated images always lie in the range
of the data they imitate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medpipe.gan import GanCheckpointError, GanError, GanMismatchError
from medpipe.gan.models import ConditionalGenerator, build_generator
from medpipe.store import store_attrs
from medpipe.training.checkpoints import read_torch_file

GAN_KIND = "medpipe-gan"
GAN_KEYS = ("kind", "generator", "g_ema", "epoch", "config", "store_content_hash", "classes", "sample_shape",
            "intensity")
SAMPLE_BATCH = 256  # images per generator call in `generate`


def to_model_space(x: torch.Tensor, intensity: Mapping[str, float]) -> torch.Tensor:
    """Data units -> [-1, 1] (the train split's [min, max] onto [-1, 1])."""
    lo, hi = float(intensity["min"]), float(intensity["max"])
    return (x - lo) * (2.0 / (hi - lo if hi > lo else 1.0)) - 1.0


def to_data_space(x: torch.Tensor, intensity: Mapping[str, float]) -> torch.Tensor:
    """[-1, 1] -> data units, clipped to the train split's [min, max]."""
    lo, hi = float(intensity["min"]), float(intensity["max"])
    return ((x + 1.0) * (0.5 * (hi - lo)) + lo).clamp(lo, hi)


def read_gan_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A GAN checkpoint's payload (weights_only=True); GanCheckpointError when absent, unreadable or not one."""
    payload = read_torch_file(path, map_location, GanCheckpointError, "GAN checkpoint")
    if not isinstance(payload, dict) or payload.get("kind") != GAN_KIND:
        raise GanCheckpointError(f"{path} is not a medpipe GAN checkpoint (train one with train_gan)")
    missing = [k for k in GAN_KEYS if k not in payload]
    if missing:
        raise GanCheckpointError(f"GAN checkpoint {path} lacks {', '.join(missing)}")
    return payload


def checkpoint_meta(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's entries without weights and training state."""
    return {k: v for k, v in payload.items() if k not in ("g", "d", "g_ema", "opt_g", "opt_d", "rng")}


def check_generator_matches_store(ckpt_meta: Mapping[str, Any], store_url: str) -> None:
    """GanMismatchError (one line) unless the checkpoint was trained on this store: same sample shape, classes
    and content hash."""
    attrs = store_attrs(store_url)
    for key, theirs in (("sample_shape", list(attrs.get("sample_shape") or [])),
                        ("classes", [str(c) for c in attrs.get("classes") or []])):
        ours = list(ckpt_meta[key])
        if key == "classes":  # the checkpoint names unnamed label values "class k" after the store's names
            ours = ours[:len(theirs)]
        if ours != theirs:
            raise GanMismatchError(f"the generator does not fit {store_url}: its {key} is {list(ckpt_meta[key])}, "
                                   f"the store's is {theirs}")
    if ckpt_meta["store_content_hash"] != attrs.get("content_hash"):
        raise GanMismatchError(f"the generator was trained on another store than {store_url} (content hash "
                               f"{str(ckpt_meta['store_content_hash'])[:12]} vs {str(attrs.get('content_hash'))[:12]})")


def load_generator(path: str | Path, store_url: str | None = None, device: str | torch.device = "cpu"
                   ) -> tuple[ConditionalGenerator, dict[str, Any]]:
    """(EMA generator in eval mode on `device`, checkpoint metadata) from a GAN last.pt; with `store_url`, also
    `check_generator_matches_store`."""
    payload = read_gan_checkpoint(path)
    meta = checkpoint_meta(payload)
    if store_url is not None:
        check_generator_matches_store(meta, store_url)
    generator = build_generator(payload["generator"])
    try:
        generator.load_state_dict(payload["g_ema"])
    except RuntimeError as exc:
        raise GanCheckpointError(f"GAN checkpoint {path}: weights do not fit its generator spec") from exc
    return generator.to(device).eval(), meta


@torch.no_grad()
def sample(generator: ConditionalGenerator, z: torch.Tensor, y: torch.Tensor, intensity: Mapping[str, float]
           ) -> torch.Tensor:
    """Images (N, C, H, W) float32 in data units from noise z (N, latent_dim) and labels y (N,), in fp32 batches."""
    parts = [to_data_space(generator(z[s : s + SAMPLE_BATCH], y[s : s + SAMPLE_BATCH]).float(), intensity)
             for s in range(0, z.shape[0], SAMPLE_BATCH)]
    if parts:
        return torch.cat(parts)
    return torch.zeros((0, *generator_shape(generator)), dtype=torch.float32, device=z.device)


def generator_shape(generator: ConditionalGenerator) -> tuple[int, ...]:
    """(C, H, W) a generator produces."""
    return tuple(int(s) for s in generator.sample_shape)


def class_noise(num_classes: int, n_per_class: int, latent_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (K*n, latent_dim), y (K*n,)): n_per_class samples of each class in class order, noise from `seed` alone."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(num_classes * n_per_class, latent_dim, generator=gen)
    return z, torch.arange(num_classes).repeat_interleave(n_per_class)


def generate(checkpoint_path: str | Path, n_per_class: int, seed: int, device: str = "cpu"
             ) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (K*n_per_class, C, H, W) in the store's value range, labels int64 (K*n_per_class,)), class
    by class, from the checkpoint's EMA generator; the same seed gives identical arrays (on one device)."""
    if n_per_class < 0:
        raise GanError(f"n_per_class must be >= 0, got {n_per_class}")
    generator, meta = load_generator(checkpoint_path, device=device)
    z, y = class_noise(int(meta["generator"]["num_classes"]), n_per_class, generator.latent_dim, seed)
    images = sample(generator, z.to(device), y.to(device), meta["intensity"])
    return images.cpu().numpy().astype(np.float32), y.numpy().astype(np.int64)


def save_sample_grid(images: np.ndarray, classes: Sequence[str], intensity: Mapping[str, float], path: Path,
                     title: str = "") -> Path:
    """A PNG of images (K*cols, C, H, W) in data units, one row per class (class-major order), grey levels over
    the train split's [min, max]; channels 1 (grey) or 3 (RGB) are shown, other counts by their first channel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(classes)
    n, c, h, w = images.shape
    cols = n // k
    lo, hi = float(intensity["min"]), float(intensity["max"])
    shown = np.clip((images - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    shown = shown if c == 3 else shown[:, :1]
    mosaic = np.ones((k * (h + 1) - 1, cols * (w + 1) - 1, shown.shape[1]), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, cols)
        mosaic[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = shown[i].transpose(1, 2, 0)
    fig = Figure(figsize=(1.0 + 0.9 * cols * w / max(h, w), 0.4 + 0.9 * k * h / max(h, w)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(mosaic if mosaic.shape[2] == 3 else mosaic[..., 0], cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + 1) + h / 2 for r in range(k)], list(classes))
    if title:
        ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
