"""GAN training configuration (one pydantic section, recorded in every GAN checkpoint)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medpipe.config import _Section

DIFFAUGMENT_OPS = ("color", "brightness", "saturation", "contrast", "translation", "cutout")

# Fields that may differ between a run and its resumption: where and how fast it runs, and how long (a GAN run is
# extended by resuming with more epochs; the learning rates are constant, so 10 + 10 epochs = 20 epochs).
GAN_RUNTIME_FIELDS = frozenset({"device", "amp", "num_workers", "epochs"})


class GanConfig(_Section):
    """How `train_gan` trains a class-conditional GAN on a 2D store (defaults: docs/augmentation.md)."""

    latent_dim: int = Field(default=128, ge=2, description="size of the noise vector z (and of the class embedding)")
    width: int = Field(default=32, ge=2, description="channels at full resolution; doubled at each halving up to "
                       "8 x width, in the generator and the discriminator")
    epochs: int = Field(default=300, ge=1, description="passes over the labelled train split")
    batch_size: int = Field(default=32, ge=2)
    lr_g: float = Field(default=1e-4, gt=0, description="generator Adam learning rate (betas 0, 0.99 as StyleGAN2); "
                        "1:4 with lr_d, the two time-scale rule of Heusel et al. 2017 as BigGAN uses it")
    lr_d: float = Field(default=4e-4, gt=0, description="discriminator Adam learning rate (betas 0, 0.99)")
    r1_gamma: float | None = Field(default=None, ge=0, description="R1 weight; None = 0.0002 * H * W / batch_size "
                                   "(the heuristic of Karras et al. 2020, StyleGAN2-ADA)")
    r1_every: int = Field(default=16, ge=1, description="lazy regularisation: R1 every k D steps, weighted by k")
    ema_decay: float = Field(default=0.999, ge=0, lt=1, description="decay of the generator weights' moving average "
                             "(G_ema, used for samples), warmed up as min(decay, (1 + step) / (10 + step))")
    diffaugment: str = Field(default="translation,cutout", description="comma-separated DiffAugment ops applied to "
                             "real and fake images inside D: translation, cutout, color (= brightness, saturation, "
                             "contrast) or each of those; empty or 'none' = off")
    min_per_class: int = Field(default=8, ge=1, description="fewest labelled train samples a class may have")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field(default="auto", description="auto = bf16 on CUDA when supported, "
                                                "else fp32; fp16 is not offered (two optimisers, no loss scaling)")
    num_workers: int = Field(default=0, ge=0)

    @field_validator("diffaugment")
    @classmethod
    def _known_ops(cls, value: str) -> str:
        unknown = [op for op in diffaugment_ops(value) if op not in DIFFAUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown DiffAugment op(s) {', '.join(unknown)}; use {', '.join(DIFFAUGMENT_OPS)}")
        return value

    def effective_r1_gamma(self, height: int, width: int) -> float:
        """The R1 weight for images of height x width (resolves None)."""
        if self.r1_gamma is not None:
            return self.r1_gamma
        return 0.0002 * height * width / self.batch_size


def diffaugment_ops(policy: str) -> list[str]:
    """The op names of a policy string ("translation,cutout" -> ["translation", "cutout"]; "" / "none" -> [])."""
    ops = [op.strip().lower() for op in policy.split(",") if op.strip()]
    return [] if ops == ["none"] else ops
