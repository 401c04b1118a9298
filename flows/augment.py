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
from tasks.augment import publish_synthetic_task, train_feature_classifier_task, train_gan_task


@flow(name="gan-augment", log_prints=False)
def gan_augment_flow(store: str, out_dir: str, config: dict[str, Any] | None = None, resume: bool = False
                     ) -> dict[str, Any]:
    """Train the GAN on STORE's train split and publish measured, memorisation-checked synthetic samples."""
    cfg = AugmentConfig.model_validate(config or {})
    generator = train_gan_task(store, str(Path(out_dir) / "gan"), cfg, resume)
    classifier = train_feature_classifier_task(store, str(Path(out_dir) / "classifier"), cfg)
    summary = publish_synthetic_task(store, out_dir, cfg, generator, classifier)
    create_markdown_artifact(key="gan-augment", markdown=augment_markdown(summary),
                             description="medpipe augment: synthetic sample quality and memorisation gate")
    return summary


def augment_markdown(summary: dict[str, Any]) -> str:
    """The artifact: quality beside the real held-out reference, the memorisation gate, where the grid is."""
    fd, prdc, memo = summary["frechet_distance"], summary["prdc"], summary["memorisation"]
    rows = [f"| Fréchet distance | {fd['fake']:.3f} | {fd['real_test']:.3f} |"]
    rows += [f"| {k} | {prdc['fake'][k]:.3f} | {prdc['real_test'][k]:.3f} |" for k in prdc["fake"]]
    gate = memo["gate"]
    return "\n".join([
        f"**{summary['n_samples']} synthetic samples** {'published to synthetic/' if summary['published'] else 'NOT published'}",
        "", "| metric | synthetic vs train | held-out real vs train |", "|---|---|---|", *rows, "",
        f"memorisation: {memo['flagged_count']} flagged ({memo['flagged_fraction']:.1%}), gate "
        f"{'passed' if gate['passed'] else 'FAILED'} (allowed {gate['max_flagged_fraction']:.1%}: {gate['rule']})",
        "", f"sample grid: `{summary['out_dir']}/samples.png`, report: `{summary['report']}`"])


def run_augment(store: str, out_dir: str, config: AugmentConfig, resume: bool = False) -> dict[str, Any]:
    """Run the flow on Prefect's embedded server (or the configured API)."""
    with shared_api_server():
        return gan_augment_flow(store=store, out_dir=out_dir, config=config.to_dict(), resume=resume)


if __name__ == "__main__":
    import sys

    print(run_augment(sys.argv[1], sys.argv[2], AugmentConfig()))
