"""`train_gan(store_url, out_dir, config)`: a class-conditional GAN on a 2D store's labelled train split.

Each step: one discriminator step (hinge loss on real and generated images, both through DiffAugment inside D;
every `r1_every` steps plus the R1 penalty on real images, lazy regularisation as in StyleGAN2) and one generator
step (hinge generator loss through the same D), then the EMA generator is updated. After each epoch: last.pt
(atomic; everything needed to resume and to sample), samples/epoch_XXX.png (EMA generator, fixed noise, one row per
class), metrics.csv and TensorBoard scalars (out_dir/tb), then `on_epoch_end(epoch, metrics)`.

Sampling from a trained run: `generate`, `load_generator`, `check_generator_matches_store` (medpipe.gan.sampling).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from medpipe import __version__
from medpipe.gan import GanMismatchError
from medpipe.gan.config import GAN_RUNTIME_FIELDS, GanConfig
from medpipe.gan.data import (TrainRows, gan_store_facts, intensity_range, labelled_batch, train_dataset,
                              train_loader)
from medpipe.gan.models import ConditionalGenerator, ProjectionDiscriminator, build_discriminator, build_generator
from medpipe.gan.sampling import (GAN_KIND, check_generator_matches_store, checkpoint_meta, class_noise, generate,
                                  load_generator, read_gan_checkpoint, sample, save_sample_grid, to_model_space)
from medpipe.training.checkpoints import save_checkpoint
from medpipe.training.engine import (_amp_dtype, _prepare_out_dir, _rng_state, _seed_everything, _set_rng_state,
                                     _start_epoch, _write_metrics_csv, resolve_device)

EpochCallback = Callable[[int, dict[str, float]], None]
ADAM_BETAS = (0.0, 0.99)  # StyleGAN2 (Karras et al. 2020)
GRID_COLUMNS = 8  # samples per class in the per-epoch grid

__all__ = ["GanResult", "train_gan", "generate", "load_generator", "check_generator_matches_store"]


@dataclass
class GanResult:
    """What a GAN run produced."""

    out_dir: Path
    last_path: Path
    samples_dir: Path
    epochs_completed: int
    device: str
    intensity: dict[str, float]  # the train split's min, max, mean, std (data units)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Nets:
    """The networks and optimisers of a run, and its step count (for lazy R1 and the EMA warm-up)."""

    g: ConditionalGenerator
    d: ProjectionDiscriminator
    g_ema: ConditionalGenerator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0


def _build(spec: dict[str, Any], config: GanConfig, device: torch.device) -> _Nets:
    g = build_generator(spec).to(device)
    d = build_discriminator(spec, config.diffaugment).to(device)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    return _Nets(g, d, g_ema, torch.optim.Adam(g.parameters(), lr=config.lr_g, betas=ADAM_BETAS),
                 torch.optim.Adam(d.parameters(), lr=config.lr_d, betas=ADAM_BETAS))


def _r1_penalty(d: nn.Module, real: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient norm of D's real logits w.r.t. the (un-augmented) real images, in fp32."""
    real = real.detach().requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        (grad,) = torch.autograd.grad(d(real, y).sum(), real, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _train_step(nets: _Nets, real: torch.Tensor, y: torch.Tensor, config: GanConfig, gamma: float,
                amp: torch.dtype | None) -> dict[str, float]:
    """One D step and one G step on a batch of real images (B, C, H, W) in model space with labels (B,)."""
    g, d, b = nets.g, nets.d, real.shape[0]
    autocast = torch.autocast(real.device.type, dtype=amp or torch.float32, enabled=amp is not None)
    d.requires_grad_(True)
    with torch.no_grad(), autocast:
        fake = g(torch.randn(b, g.latent_dim, device=real.device), y)
    with autocast:  # separate calls: D's minibatch-stddev channel must not mix real and generated images
        d_real, d_fake = d(real, y).float(), d(fake.to(real.dtype), y).float()
    loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    stats = {"loss_d": float(loss_d.detach()), "d_real": float(d_real.detach().mean()),
             "d_fake": float(d_fake.detach().mean())}
    if gamma > 0 and nets.step % config.r1_every == 0:
        r1 = _r1_penalty(d, real, y)
        loss_d = loss_d + r1 * (0.5 * gamma * config.r1_every)
        stats["r1"] = float(r1.detach())
    nets.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    nets.opt_d.step()

    d.requires_grad_(False)  # G step: gradients flow through D to G, D's weights get none
    with autocast:
        loss_g = -d(g(torch.randn(b, g.latent_dim, device=real.device), y), y).float().mean()
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    nets.opt_g.step()
    _ema_update(nets.g_ema, g, min(config.ema_decay, (1 + nets.step) / (10 + nets.step)))
    nets.step += 1
    stats["loss_g"] = float(loss_g.detach())
    return stats


def _run_meta(config: GanConfig, facts: dict[str, Any], spec: dict[str, Any], intensity: dict[str, float]
              ) -> dict[str, Any]:
    """Checkpoint entries besides weights and training state."""
    return {"kind": GAN_KIND, "code_version": __version__, "config": config.to_dict(), "generator": spec,
            "store_content_hash": facts["content_hash"], "classes": facts["classes"],
            "sample_shape": facts["sample_shape"], "class_counts": facts["class_counts"], "intensity": intensity}


def _check_resumable(ckpt: dict[str, Any], config: GanConfig, store_url: str, path: Path) -> None:
    check_generator_matches_store(checkpoint_meta(ckpt), store_url)
    saved, asked = dict(ckpt["config"]), config.to_dict()
    changed = {k for k in saved.keys() | asked.keys() if saved.get(k) != asked.get(k)} - GAN_RUNTIME_FIELDS
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {asked.get(k)!r}" for k in sorted(changed))
        raise GanMismatchError(f"{path} was made with a different config ({detail}); resume with the same settings "
                               "(only epochs, device, amp and num_workers may change)")


def _epoch_metrics(rows: list[dict[str, float]], last_r1: float) -> dict[str, float]:
    keys = ("loss_d", "loss_g", "d_real", "d_fake")
    out = {k: sum(r[k] for r in rows) / len(rows) if rows else float("nan") for k in keys}
    out["r1"] = last_r1  # the latest lazy R1 value (not every epoch has an R1 step)
    return out


def train_gan(store_url: str, out_dir: str | Path, config: GanConfig | None = None, resume: bool = False,
              progress: bool = False, on_epoch_end: EpochCallback | None = None, *,
              overwrite: bool = False) -> GanResult:
    """Train the class-conditional GAN on the labelled train split of a 2D store; write out_dir/last.pt,
    samples/epoch_XXX.png, metrics.csv and tb/. resume=True continues from last.pt (same store and config; more
    epochs allowed); overwrite=True discards an earlier run. `on_epoch_end(epoch, metrics)` runs after each
    epoch's checkpoint. Bad input raises a GanInputError / GanMismatchError (one line)."""
    config = config or GanConfig()
    started = time.perf_counter()
    out = Path(out_dir)
    facts = gan_store_facts(store_url, config.min_per_class)
    _prepare_out_dir(out, resume, overwrite)
    ckpt = read_gan_checkpoint(out / "last.pt") if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, config, store_url, out / "last.pt")
    samples_dir = out / "samples"
    if not resume:
        for old in samples_dir.glob("epoch_*.png"):
            old.unlink()

    device = resolve_device(config.device)
    amp = _amp_dtype(config.amp, device)
    if amp == torch.float16:  # amp auto on a GPU without bf16: fp32 (fp16 would need loss scaling)
        amp = None
    _seed_everything(config.seed)
    rows: TrainRows = facts["rows"]
    ds = train_dataset(store_url)
    intensity = dict(ckpt["intensity"]) if ckpt is not None else intensity_range(ds, rows)
    loader = train_loader(ds, config, device)
    c, h, w = facts["sample_shape"]
    spec = {"latent_dim": config.latent_dim, "num_classes": facts["num_classes"], "sample_shape": [c, h, w],
            "width": config.width}
    nets = _build(spec, config, device)
    gamma = config.effective_r1_gamma(h, w)
    meta = _run_meta(config, facts, spec, intensity)
    fixed_z, fixed_y = class_noise(facts["num_classes"], GRID_COLUMNS, config.latent_dim, config.seed)
    fixed_z, fixed_y = fixed_z.to(device), fixed_y.to(device)

    history: list[dict[str, float]] = []
    start_epoch, last_r1 = 0, float("nan")
    if ckpt is not None:
        for name in ("g", "d", "g_ema", "opt_g", "opt_d"):
            getattr(nets, name).load_state_dict(ckpt[name])
        nets.step, start_epoch, history = int(ckpt["step"]), int(ckpt["epoch"]), list(ckpt["history"])
        last_r1 = float(history[-1]["r1"]) if history else last_r1
        _set_rng_state(ckpt["rng"])
        _write_metrics_csv(out / "metrics.csv", history)  # drop rows written after the checkpoint

    from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

    writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            nets.g.train()
            nets.d.train()
            _start_epoch(loader, config.seed, epoch)
            steps, seen = [], 0
            for batch in tqdm(loader, desc=f"gan epoch {epoch}/{config.epochs}", disable=not progress, leave=False):
                real, y = labelled_batch(batch, rows)
                if real.shape[0] < 2:
                    continue
                real = to_model_space(real.to(device, non_blocking=True), intensity)
                steps.append(_train_step(nets, real, y.to(device, non_blocking=True), config, gamma, amp))
                last_r1 = steps[-1].get("r1", last_r1)
                seen += real.shape[0]
            train_seconds = time.perf_counter() - t0
            metrics: dict[str, float] = {"epoch": epoch, **_epoch_metrics(steps, last_r1),
                                         "images_per_s": seen / max(train_seconds, 1e-9)}
            images = sample(nets.g_ema, fixed_z, fixed_y, intensity).cpu().numpy()
            save_sample_grid(images, facts["classes"], intensity, samples_dir / f"epoch_{epoch:03d}.png",
                             title=f"epoch {epoch} (EMA generator)")
            metrics["seconds"] = time.perf_counter() - t0
            history.append(metrics)
            save_checkpoint(out / "last.pt", {
                **meta, "g": nets.g.state_dict(), "d": nets.d.state_dict(), "g_ema": nets.g_ema.state_dict(),
                "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(), "epoch": epoch,
                "step": nets.step, "history": history, "rng": _rng_state()})
            _write_metrics_csv(out / "metrics.csv", history)
            for key, value in metrics.items():
                if key != "epoch":
                    writer.add_scalar(f"gan/{key}", value, epoch)
            writer.flush()
            if progress:
                tqdm.write(f"gan epoch {epoch}/{config.epochs}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        writer.close()
    return GanResult(out_dir=out, last_path=out / "last.pt", samples_dir=samples_dir, epochs_completed=len(history),
                     device=str(device), intensity=intensity, history=history,
                     seconds=time.perf_counter() - started)
