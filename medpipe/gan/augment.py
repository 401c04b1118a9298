"""`medpipe augment`: train the conditional GAN on a store's train split, generate samples, measure their quality,
check memorisation, and — only when the memorisation gate passes — publish them as the store's `synthetic/` set.

    augment_store(store, out_dir, config) -> AugmentResult
        classifier (feature space) -> GAN -> generate -> quality -> memorisation gate -> synthetic/ + report

Held-out reference for memorisation: the val and test splits together (more held-out images give a tighter chance
gate, docs/augmentation.md). The feature space is the penultimate layer of a `small-cnn` classifier trained on the
real train split only (val selects its epoch), or one given with `classifier=`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field

from medpipe.config import _Section
from medpipe.gan import GanError
from medpipe.gan.config import GanConfig
from medpipe.gan.data import gan_store_facts
from medpipe.gan.memorisation import memorisation_check, plot_memorisation
from medpipe.gan.quality import feature_extractor, quality_report
from medpipe.gan.sampling import check_generator_matches_store, generate, load_generator, save_sample_grid
from medpipe.gan.synthetic import Provenance, write_synthetic
from medpipe.store import SPLIT_CODES, get_array, open_store, store_attrs
from medpipe.task import Task
from medpipe.training.checkpoints import file_sha256

EpochCallback = Callable[[int, dict[str, float]], None]


class MemorisationGateError(GanError):
    """The synthetic set failed the memorisation gate: it was not written to the store."""


class AugmentConfig(_Section):
    """What `medpipe augment` does besides training the GAN (`gan`)."""

    gan: GanConfig = GanConfig()
    n_per_class: int = Field(default=256, ge=1, description="synthetic samples written per class")
    seed: int = Field(default=0, description="generation seed: the same seed writes the same samples")
    max_flagged_fraction: float | None = Field(
        default=None, ge=0, le=1, description="memorisation gate: the largest fraction of synthetic samples allowed "
        "closer to a training image than any held-out image is; None = the chance level of fresh real images")
    publish_failing: bool = Field(default=False, description="write the set even when the gate fails (not advised)")
    classifier_epochs: int = Field(default=10, ge=1, description="epochs of the feature-space classifier")


@dataclass(frozen=True)
class AugmentResult:
    """Where things are, and the headline numbers."""

    out_dir: Path
    generator: Path
    classifier: Path
    report: Path
    published: bool
    n_samples: int
    quality: dict[str, Any]
    memorisation: dict[str, Any]


def split_images(store_url: str, split: str | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, C, H, W), labels (n,)) of the labelled samples of one or more splits, in store order."""
    names = (split,) if isinstance(split, str) else split
    root = open_store(store_url)
    codes = np.asarray(get_array(root, "samples/split")[...])
    labels = np.asarray(get_array(root, "training/labels")[...])
    rows = np.flatnonzero(np.isin(codes, [SPLIT_CODES[n] for n in names]) & (labels >= 0))
    images = get_array(root, "training/images")
    return (np.asarray(images.get_orthogonal_selection((rows,))) if rows.size else
            np.zeros((0, *images.shape[1:]), np.float32)), labels[rows]


def train_feature_classifier(store_url: str, out_dir: str | Path, epochs: int, seed: int) -> Path:
    """A small-cnn classifier on the real train split (val selects the epoch): the quality feature space."""
    from medpipe.training.config import TrainConfig
    from medpipe.training.engine import train

    result = train(store_url, out_dir, TrainConfig(task=Task.classify, model="small-cnn", epochs=epochs, seed=seed),
                   progress=False, overwrite=True)
    return Path(result.best_path)


def augment_store(store_url: str, out_dir: str | Path, config: AugmentConfig | None = None, *,
                  generator: str | Path | None = None, classifier: str | Path | None = None,
                  resume: bool = False, on_epoch_end: EpochCallback | None = None) -> AugmentResult:
    """Train (or take `generator`), generate `n_per_class` per class, measure, gate, publish; see module docs.

    Writes out_dir/{gan/, classifier/, augment_report.json, samples.png, memorisation.png}. Raises
    MemorisationGateError (after writing the report) when the gate fails and `publish_failing` is off; the store
    is then unchanged."""
    from medpipe.gan.train import train_gan

    config = config or AugmentConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = gan_store_facts(store_url, config.gan.min_per_class)  # one-line errors before any training
    held_out, held_labels = split_images(store_url, ("val", "test"))
    if not len(held_out):
        raise GanError(f"{store_url} has no labelled val or test samples: the memorisation check needs held-out "
                       "real images (ingest with val/test fractions)")
    if generator is None:
        generator = train_gan(store_url, out / "gan", config.gan, resume=resume, on_epoch_end=on_epoch_end,
                              overwrite=not resume).last_path
    _, meta = load_generator(generator)
    check_generator_matches_store(meta, store_url)
    if classifier is None:
        classifier = train_feature_classifier(store_url, out / "classifier", config.classifier_epochs, config.seed)
    extractor = feature_extractor(classifier)

    fake, fake_labels = generate(generator, config.n_per_class, config.seed)
    train_images, train_labels = split_images(store_url, "train")
    quality = quality_report(train_images, held_out, fake, extractor, train_labels=train_labels,
                             test_labels=held_labels, fake_labels=fake_labels, seed=config.seed)
    memo = memorisation_check(train_images, held_out, fake, extractor,
                              max_flagged_fraction=config.max_flagged_fraction)
    closest = memo["spaces"]["pixel"]
    plot_memorisation(fake, train_images, memo["flagged"], closest["nn_index"], out / "memorisation.png",
                      distances=closest["distances"])
    save_sample_grid(_grid_rows(fake, fake_labels, facts["num_classes"]), facts["classes"], meta["intensity"],
                     out / "samples.png", title=f"synthetic samples (seed {config.seed})")
    published = bool(memo["gate"]["passed"] or config.publish_failing)
    generator_sha = file_sha256(generator)
    memo_summary = _memo_summary(memo)
    summary: dict[str, Any] = {
        "store_content_hash": store_attrs(store_url).get("content_hash"), "generator": str(generator),
        "generator_sha256": generator_sha, "classifier": str(classifier), "n_per_class": config.n_per_class,
        "seed": config.seed, "published": published, "quality": quality, "memorisation": memo_summary}
    report = out / "augment_report.json"
    report.write_text(json.dumps(summary, indent=1, default=_json_default))
    if not published:
        raise MemorisationGateError(
            f"the synthetic set failed the memorisation gate ({memo['flagged_fraction']:.1%} of samples closer to a "
            f"training image than any held-out image; allowed {memo['gate']['max_flagged_fraction']:.1%}): not "
            f"written; see {out / 'memorisation.png'}")
    write_synthetic(store_url, fake, fake_labels, np.full(len(fake), config.seed), Provenance(
        generator_sha256=generator_sha, generator_epoch=int(meta["epoch"]),
        trained_on_content_hash=str(meta["store_content_hash"]), seed=config.seed, n_per_class=config.n_per_class,
        classes=list(facts["classes"]), sample_shape=list(facts["sample_shape"]),
        quality=_quality_summary(quality), memorisation=memo_summary))
    quality["tstr"] = tstr_vs_trtr(store_url, out / "tstr", Path(classifier), len(fake), len(train_images), config)
    report.write_text(json.dumps({**summary, "quality": quality}, indent=1, default=_json_default))
    return AugmentResult(out, Path(generator), Path(classifier), report, published, len(fake), quality, memo_summary)


def tstr_vs_trtr(store_url: str, out_dir: Path, trtr_checkpoint: Path, n_fake: int, n_real: int,
                 config: AugmentConfig) -> dict[str, Any]:
    """Test metrics of the same classifier trained on the published synthetic set alone (TSTR) and on the real
    train split (TRTR: the feature classifier), both scored on the real test split."""
    from medpipe.training.config import TrainConfig
    from medpipe.training.engine import train

    tstr = train(store_url, out_dir, TrainConfig(task=Task.classify, model="small-cnn", epochs=config.classifier_epochs,
                                                 seed=config.seed, synthetic_only=True,
                                                 synthetic_ratio=n_fake / max(n_real, 1)),
                 progress=False, overwrite=True)
    return {"tstr": dict(tstr.test_metrics), "trtr": _summary_test(trtr_checkpoint),
            "note": "the same small-cnn and epochs; TSTR trains on the synthetic samples only, TRTR on the real train "
                    "split; both are scored once on the real test split"}


def _summary_test(checkpoint: Path) -> dict[str, Any]:
    """Test metrics a training run wrote to its summary.json (beside best.pt)."""
    summary = checkpoint.parent / "summary.json"
    return dict(json.loads(summary.read_text()).get("test_metrics") or {}) if summary.exists() else {}


def _grid_rows(images: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 8) -> np.ndarray:
    """The first `per_row` samples of each class, class-major (the sample grid's layout)."""
    return np.concatenate([images[labels == k][:per_row] for k in range(num_classes)])


def _memo_summary(memo: dict[str, Any]) -> dict[str, Any]:
    """The memorisation result without per-sample arrays (those stay in the report's plot)."""
    return {"n": memo["n"], "flagged_count": len(memo["flagged"]), "flagged_fraction": memo["flagged_fraction"],
            "gate": memo["gate"], "warnings": memo["warnings"],
            "thresholds": {name: s["threshold"] for name, s in memo["spaces"].items()}}


def _quality_summary(quality: dict[str, Any]) -> dict[str, Any]:
    return {"frechet_distance": quality["frechet_distance"], "prdc": quality["prdc"],
            "feature_space": quality["feature_space"], "mode_collapse": quality["diversity"]["mode_collapse"],
            "collapsed_classes": quality["diversity"]["collapsed_classes"]}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = ["AugmentConfig", "AugmentResult", "MemorisationGateError", "augment_store", "split_images",
           "train_feature_classifier"]
