"""Thin Prefect tasks over medpipe.gan: train the GAN, train the feature classifier, publish a synthetic set."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from medpipe.gan.augment import AugmentConfig
from medpipe.gan.experiment import ExperimentConfig
from tasks.options import STEP_TASK


@task(name="train-gan", **STEP_TASK)
def train_gan_task(store: str, out_dir: str, config: AugmentConfig, resume: bool) -> str:
    """Train the conditional GAN on STORE's train split; logs each epoch's losses; returns last.pt's path."""
    from medpipe.gan.train import train_gan

    logger = get_run_logger()

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logger.info("GAN epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                          if isinstance(v, float)))

    result = train_gan(store, out_dir, config.gan, resume=resume, overwrite=not resume, on_epoch_end=log_epoch)
    return str(result.last_path)


@task(name="train-feature-classifier", **STEP_TASK)
def train_feature_classifier_task(store: str, out_dir: str, config: AugmentConfig) -> str:
    """The real-only classifier whose penultimate layer is the quality feature space; returns best.pt's path."""
    from medpipe.gan.augment import train_feature_classifier

    return str(train_feature_classifier(store, out_dir, config.classifier_epochs, config.seed))


@task(name="generate-measure-publish", **STEP_TASK)
def publish_synthetic_task(store: str, out_dir: str, config: AugmentConfig, generator: str,
                           classifier: str) -> dict[str, Any]:
    """Generate, measure quality and memorisation, publish when the gate passes; returns paths and numbers."""
    from medpipe.gan.augment import augment_store

    result = augment_store(store, out_dir, config, generator=generator, classifier=classifier)
    return {"out_dir": str(result.out_dir), "report": str(result.report), "generator": str(result.generator),
            "published": result.published, "n_samples": result.n_samples,
            "frechet_distance": result.quality["frechet_distance"], "prdc": result.quality["prdc"],
            "memorisation": result.memorisation}


@task(name="augmentation-experiment", **STEP_TASK)
def experiment_task(store: str, out_dir: str, config: ExperimentConfig) -> dict[str, Any]:
    """The augmentation experiment; logs each run's test AUROC; returns the comparison (no arrays)."""
    from medpipe.gan.experiment import augmentation_experiment

    logger = get_run_logger()

    def log_run(run: dict[str, Any]) -> None:
        logger.info("fraction %g seed %d %s: test AUROC %.3f", run["fraction"], run["seed"], run["arm"],
                    run["scores"]["auroc"]["value"])

    return augmentation_experiment(store, out_dir, config, on_run=log_run)
