"""`medpipe augment-experiment`: does the synthetic set help a classifier on this data?

For each fraction of the real train patients and each seed, the same classifier is trained four ways — real only,
real + synthetic, real + classic augmentation, all (optionally a fifth: synthetic only, TSTR) — selected on val and scored once on the real test split:
accuracy, sensitivity, specificity, macro F1 and AUROC, each with a bootstrap 95% CI over test images. Across seeds
(the same seed draws the same patients for every arm) each arm is compared with real-only by the paired mean
difference and its t-interval; the verdict per fraction and metric is "helps" / "hurts" when that interval excludes
0, else "no clear difference".

Caveat, reported with the results: the synthetic set is the one in STORE/synthetic/, whose generator saw the whole
train split; at fractions below 1 it has seen more real patients than the classifier it augments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import Field
from scipy import stats

from medpipe.config import _Section
from medpipe.evaluation.bootstrap import bootstrap_ci, with_confidence_intervals
from medpipe.evaluation.metrics import classification_metrics
from medpipe.gan import GanError
from medpipe.gan.synthetic import check_synthetic_current
from medpipe.task import Task
from medpipe.training.config import TrainConfig

ARMS: dict[str, tuple[bool, bool]] = {  # arm -> (synthetic samples, classic augmentation)
    "real": (False, False), "real+synthetic": (True, False), "real+classic": (False, True), "all": (True, True),
    "synthetic-only": (True, False)}  # TSTR (train on synthetic, test on real); "real" at fraction 1 is TRTR
METRICS = ("accuracy", "sensitivity", "specificity", "f1_macro", "auroc")
RunCallback = Callable[[dict[str, Any]], None]


class ExperimentConfig(_Section):
    """The grid of the augmentation experiment."""

    fractions: list[float] = Field(default=[0.1, 0.25, 1.0], description="fractions of the train patients")
    seeds: list[int] = Field(default=[0, 1, 2], description="replicates; a seed draws the same patients in every arm")
    arms: list[str] = Field(default=[a for a in ARMS if a != "synthetic-only"],
                            description="subset of real, real+synthetic, real+classic, all, synthetic-only (TSTR)")
    synthetic_ratio: float = Field(default=1.0, gt=0, description="synthetic samples per real train sample")
    train: TrainConfig = TrainConfig(task=Task.classify)
    n_boot: int = Field(default=1000, ge=100)


def _binary_rates(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of the positive class (index 1) for bootstrap resamples (B, N)."""
    pred = y_prob.argmax(axis=-1)
    pos, neg = y_true == 1, y_true == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = ((pred == 1) & pos).sum(axis=-1) / pos.sum(axis=-1)
        spec = ((pred == 0) & neg).sum(axis=-1) / neg.sum(axis=-1)
    return sens, spec


def score_test_split(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], n_boot: int, seed: int = 0
                ) -> dict[str, dict[str, float]]:
    """{metric: {value, low, high}} on the test split: accuracy, F1, AUROC (medpipe.evaluation) and, for two
    classes, sensitivity/specificity of class 1 (recall of classes[1] / of classes[0]) with percentile CIs."""
    metrics = with_confidence_intervals(classification_metrics(y_true, y_prob, classes), y_true, y_prob,
                                        n_boot=n_boot, seed=seed)
    out = {m: {"value": float(metrics[m]), "low": float(metrics["ci"][m]["low"]),
               "high": float(metrics["ci"][m]["high"])} for m in ("accuracy", "f1_macro", "auroc")}
    if len(classes) == 2:
        for k, name in enumerate(("sensitivity", "specificity")):
            def fn(t: np.ndarray, p: np.ndarray, k: int = k) -> np.ndarray:
                return _binary_rates(t, p)[k]

            low, high = bootstrap_ci(fn, y_true, y_prob, n_boot=n_boot, seed=seed, batched=True)
            point = float(_binary_rates(y_true[None], y_prob[None])[k][0])
            out[name] = {"value": point, "low": float(low), "high": float(high)}
    return out


def run_arm(store_url: str, out_dir: Path, config: ExperimentConfig, fraction: float, seed: int, arm: str
            ) -> dict[str, Any]:
    """Train one arm of one (fraction, seed) cell and score it on the real test split."""
    from medpipe.training.checkpoints import load_model
    from medpipe.training.engine import predict, train

    synthetic, classic = ARMS[arm]
    cfg = config.train.model_copy(update={"seed": seed, "train_fraction": fraction, "augment": classic,
                                          "synthetic_ratio": config.synthetic_ratio if synthetic else 0.0,
                                          "synthetic_only": arm == "synthetic-only"})
    result = train(store_url, out_dir, cfg, progress=False, overwrite=True)
    model, meta = load_model(result.best_path)
    pred = predict(model, store_url, "test", task=Task.classify)
    scores = score_test_split(pred["y_true"], pred["y_prob"], list(meta["classes"]), config.n_boot, seed)
    return {"fraction": fraction, "seed": seed, "arm": arm, "best_epoch": result.best_epoch,
            "n_test": int(len(pred["y_true"])), "scores": scores}


def compare_arms(runs: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per fraction, arm (vs real) and metric: mean over seeds, the paired mean difference to real-only with its
    t-interval over seeds, and the verdict (helps / hurts / no clear difference / too few seeds)."""
    table = {(r["fraction"], r["arm"], r["seed"]): r["scores"] for r in runs}
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            for metric in METRICS:
                seeds = sorted(s for (f, a, s), v in table.items() if f == fraction and a == arm and metric in v)
                values = np.array([table[(fraction, arm, s)][metric]["value"] for s in seeds], dtype=np.float64)
                row: dict[str, Any] = {"fraction": fraction, "arm": arm, "metric": metric, "n_seeds": len(seeds),
                                       "mean": float(np.nanmean(values)) if len(values) else math.nan,
                                       "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan}
                base = [table.get((fraction, "real", s), {}).get(metric, {}).get("value") for s in seeds]
                if arm != "real" and all(b is not None for b in base) and len(seeds):
                    diff = values - np.array(base, dtype=np.float64)
                    diff = diff[np.isfinite(diff)]
                    row.update(_paired(diff, alpha))
                rows.append(row)
    return rows


def _paired(diff: np.ndarray, alpha: float) -> dict[str, Any]:
    """Mean paired difference, its t-interval over seeds, and the verdict."""
    if diff.size < 2:
        return {"diff_vs_real": float(diff.mean()) if diff.size else math.nan, "diff_low": math.nan,
                "diff_high": math.nan, "verdict": "too few seeds"}
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))
    half = float(stats.t.ppf(1 - alpha / 2, diff.size - 1)) * se
    verdict = "helps" if mean - half > 0 else "hurts" if mean + half < 0 else "no clear difference"
    return {"diff_vs_real": mean, "diff_low": mean - half, "diff_high": mean + half, "verdict": verdict}


def plot_experiment(rows: list[dict[str, Any]], out_path: Path, metrics: tuple[str, ...] = ("auroc", "accuracy",
                    "sensitivity", "specificity")) -> Path:
    """Metric vs fraction of real train patients, one line per arm (mean over seeds, error bars = sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = sorted((r["fraction"], r["mean"], r["sd"]) for r in rows if r["metric"] == metric and r["arm"] == arm)
            x, y, e = (np.array(v, dtype=np.float64) for v in zip(*pts))
            ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=arm)
        fractions = sorted({r["fraction"] for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("fraction of real train patients")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Augmentation experiment: test metrics (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def augmentation_experiment(store_url: str, out_dir: str | Path, config: ExperimentConfig | None = None,
                            on_run: RunCallback | None = None) -> dict[str, Any]:
    """Run the grid (see module docs); writes out_dir/{runs/, experiment.json, experiment.csv, experiment.png}."""
    config = config or ExperimentConfig()
    unknown = sorted(set(config.arms) - set(ARMS))
    if unknown or "real" not in config.arms:
        raise GanError(f"arms must include 'real' and be among {', '.join(ARMS)}; got {config.arms}")
    if any(ARMS[a][0] for a in config.arms):
        provenance = check_synthetic_current(store_url)  # one line when there is no current synthetic set
    else:
        provenance = {}
    out = Path(out_dir)
    runs = []
    for fraction in config.fractions:
        for seed in config.seeds:
            for arm in config.arms:
                run = run_arm(store_url, out / "runs" / f"f{fraction:g}-s{seed}-{arm}", config, fraction, seed, arm)
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    rows = compare_arms(runs)
    caveats = ["the synthetic set's generator saw the whole train split: at fractions below 1 it has seen more "
               "real patients than the classifier it augments"] if any(f < 1 for f in config.fractions) else []
    result = {"config": config.to_dict(), "synthetic": {k: provenance.get(k) for k in
              ("generator_sha256", "seed", "n_per_class", "trained_on_content_hash")},
              "runs": runs, "comparison": rows, "caveats": caveats, "summary": verdict_lines(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(result, indent=1, default=str))
    _write_csv(rows, out / "experiment.csv")
    result["plot"] = str(plot_experiment(rows, out / "experiment.png"))
    return result


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences: where synthetic data helps, where it does not, where it hurts (AUROC and sensitivity)."""
    lines = []
    for row in rows:
        if row.get("verdict") and row["metric"] in ("auroc", "sensitivity", "specificity"):
            lines.append(f"{row['arm']} at {row['fraction']:g} of the train patients: {row['verdict']} for "
                         f"{row['metric']} (difference to real-only {row['diff_vs_real']:+.3f}, 95% CI "
                         f"{row['diff_low']:+.3f} to {row['diff_high']:+.3f}, {row['n_seeds']} seeds)")
    return lines


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = ["fraction", "arm", "metric", "n_seeds", "mean", "sd", "diff_vs_real", "diff_low", "diff_high", "verdict"]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


__all__ = ["ARMS", "ExperimentConfig", "augmentation_experiment", "compare_arms", "plot_experiment", "run_arm",
           "score_test_split", "verdict_lines"]
