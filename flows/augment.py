"""GAN augmentation flow: train GAN -> feature classifier -> generate, measure, gate, publish (synthetic/ in the
store), with the quality numbers as a Prefect artifact. The experiment (real vs real + synthetic) is
`medpipe augment-experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.runtime import shared_api_server
from medpipe.gan.augment import AugmentConfig
from medpipe.gan.experiment import ExperimentConfig
from tasks.augment import (experiment_task, publish_synthetic_task, train_feature_classifier_task,
                           train_gan_task)


@flow(name="gan-augment", log_prints=False)
def gan_augment_flow(store: str, out_dir: str, config: dict[str, Any] | None = None, resume: bool = False,
                     experiment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the GAN on STORE's train split, publish measured, memorisation-checked synthetic samples, and (when
    `experiment` is given) run the augmentation experiment on them."""
    cfg = AugmentConfig.model_validate(config or {})
    generator = train_gan_task(store, str(Path(out_dir) / "gan"), cfg, resume)
    classifier = train_feature_classifier_task(store, str(Path(out_dir) / "classifier"), cfg)
    summary = publish_synthetic_task(store, out_dir, cfg, generator, classifier)
    create_markdown_artifact(key="gan-augment", markdown=augment_markdown(summary),
                             description="medpipe augment: synthetic sample quality and memorisation gate")
    if experiment is not None:
        summary["experiment"] = augment_experiment_flow(store, str(Path(out_dir) / "experiment"), experiment)
    return summary


@flow(name="augment-experiment", log_prints=False)
def augment_experiment_flow(store: str, out_dir: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Real vs real + synthetic vs real + classic vs all, at several fractions and seeds (test metrics with CIs)."""
    result = experiment_task(store, out_dir, ExperimentConfig.model_validate(config or {}))
    create_markdown_artifact(key="augment-experiment", markdown=experiment_markdown(result),
                             description="medpipe augment-experiment: where synthetic data helps, and where not")
    return result


def experiment_markdown(result: dict[str, Any]) -> str:
    """The experiment artifact: the comparison table (mean over seeds, paired difference to real-only)."""
    rows = ["| fraction | arm | metric | mean (sd) | vs real (95% CI) | verdict |", "|---|---|---|---|---|---|"]
    for r in result["comparison"]:
        diff = (f"{r['diff_vs_real']:+.3f} ({r['diff_low']:+.3f}, {r['diff_high']:+.3f})"
                if "diff_vs_real" in r else "")
        rows.append(f"| {r['fraction']:g} | {r['arm']} | {r['metric']} | {r['mean']:.3f} ({r['sd']:.3f}) | {diff} "
                    f"| {r.get('verdict', '')} |")
    return "\n".join([*result["summary"], "", *rows, "", *[f"caveat: {c}" for c in result["caveats"]],
                      f"plot: `{result['plot']}`"])


def augment_markdown(summary: dict[str, Any]) -> str:
    """The artifact: quality beside the real held-out reference, the memorisation gate, where the grid is."""
    fd, prdc, memo = summary["frechet_distance"], summary["prdc"], summary["memorisation"]
    rows = [f"| Fréchet distance | {_number(fd['fake'])} | {_number(fd['real_test'])} |"]
    names = next((list(v) for v in prdc.values() if v), ["precision", "recall", "density", "coverage"])
    rows += [f"| {k} | {_number((prdc['fake'] or {}).get(k))} | {_number((prdc['real_test'] or {}).get(k))} |"
             for k in names]
    gate = memo["gate"]
    return "\n".join([
        f"**{summary['n_samples']} synthetic samples** {'published to synthetic/' if summary['published'] else 'NOT published'}",
        "", "| metric | synthetic vs train | held-out real vs train |", "|---|---|---|", *rows, "",
        f"memorisation: {memo['flagged_count']} flagged ({memo['flagged_fraction']:.1%}), gate "
        f"{'passed' if gate['passed'] else 'FAILED'} (allowed {gate['max_flagged_fraction']:.1%}: {gate['rule']})",
        "", f"sample grid: `{summary['out_dir']}/samples.png`, report: `{summary['report']}`"])


def _number(value: float | None) -> str:
    """A metric for the table; n/a where the sets were too small to compute it (few held-out images)."""
    return "n/a (too few held-out images)" if value is None else f"{value:.3f}"


def run_experiment(store: str, out_dir: str, config: ExperimentConfig) -> dict[str, Any]:
    """Run the experiment flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return augment_experiment_flow(store=store, out_dir=out_dir, config=config.to_dict())


def run_augment(store: str, out_dir: str, config: AugmentConfig, resume: bool = False) -> dict[str, Any]:
    """Run the flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return gan_augment_flow(store=store, out_dir=out_dir, config=config.to_dict(), resume=resume)


if __name__ == "__main__":
    import sys

    print(run_augment(sys.argv[1], sys.argv[2], AugmentConfig()))
