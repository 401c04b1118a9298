"""Model promotion: is a candidate model not worse than the current (promoted) one on the fixed test split?

Both models are scored on the SAME split of the same store with the evaluation code (`engine.predict` and
`metrics.classification_metrics` / `segmentation_metrics` for fixed-layout stores, `predict.iter_case_predictions`
and `volume_metrics.case_metrics` on each case's source grid for volumes-layout stores). Primary metric: macro
AUROC (classification; accuracy is shown too) or mean Dice over cases (segmentation). The candidate-minus-current
difference gets a 95% percentile interval from a paired bootstrap that resamples *patients* (all samples of a drawn
patient enter together; the same resamples for both models).

Rule: promote when there is no current model, or when candidate >= current - tolerance (point estimates): "not
worse on the fixed test split". A candidate trained on another store content is never promoted (it was selected
on another store: retrain it on this one); a current model that cannot be scored on this store (another task, classes, sample shape or
preprocessing) cannot be compared, and the candidate is then promoted with a reason that says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import UserError
from medpipe.evaluation.bootstrap import batched_auroc, bootstrap_ci
from medpipe.evaluation.evaluate import resolve_checkpoint
from medpipe.evaluation.metrics import classification_metrics, segmentation_metrics
from medpipe.evaluation.report import to_jsonable
from medpipe.predict import is_volumes_checkpoint
from medpipe.store import SPLIT_CODES, store_attrs
from medpipe.task import Task
from medpipe.training.checkpoints import file_sha256, load_model

__all__ = ["ModelScores", "PromotionDecision", "PromotionError", "compare_models", "incomparable_reason",
           "paired_patient_bootstrap", "score_model"]

PROMOTION_JSON = "promotion.json"
METRIC_NAMES = {Task.classify: "auroc", Task.segment: "dice_mean"}
METRIC_TITLES = {"auroc": "AUROC", "dice_mean": "mean Dice"}


class PromotionError(UserError, ValueError):
    """Models or a store that cannot be compared at all (the message says why)."""


@dataclass(frozen=True)
class ModelScores:
    """One model's per-sample results on a split: store rows, patient pseudonyms and what the metric needs
    (classify: labels y_true (N,) and probabilities y_prob (N, K); segment: per-case Dice (N,))."""

    task: Task
    rows: np.ndarray
    patients: np.ndarray
    y_true: np.ndarray | None = None
    y_prob: np.ndarray | None = None
    dice: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Scored samples (images or cases)."""
        return int(self.rows.size)

    def primary(self, take: np.ndarray | None = None) -> float:
        """The primary metric over the samples at positions `take` (all when None), as the bootstrap computes it
        (AUROC: the evaluation's Mann-Whitney AUROC, NaN when undefined; Dice: the mean)."""
        take = np.arange(self.n) if take is None else take
        if self.task is Task.classify:
            assert self.y_true is not None and self.y_prob is not None
            return float(batched_auroc(self.y_true[take][None], self.y_prob[take][None])[0])
        assert self.dice is not None
        return float(np.mean(self.dice[take])) if take.size else math.nan

    def headline(self, classes: list[str]) -> dict[str, float]:
        """{metric: value} (classify: AUROC and accuracy, by the evaluation's functions; segment: mean Dice)."""
        if self.task is Task.classify:
            assert self.y_true is not None and self.y_prob is not None
            names = classes if len(classes) == self.y_prob.shape[1] else [f"class {k}" for k in
                                                                           range(self.y_prob.shape[1])]
            full = classification_metrics(self.y_true, self.y_prob, names)
            # AUROC in float64 as the bootstrap computes it (torchmetrics' is float32): the point estimate and its
            # interval then agree exactly (e.g. 1.0, not 1.0000001, for a perfect ranking)
            return {"auroc": self.primary(), "accuracy": float(full["accuracy"])}
        return {"dice_mean": self.primary()}

    def subset(self, keep: np.ndarray) -> "ModelScores":
        """The same scores restricted to positions `keep`."""
        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[keep]

        return ModelScores(self.task, self.rows[keep], self.patients[keep], pick(self.y_true), pick(self.y_prob),
                           pick(self.dice))


@dataclass(frozen=True)
class PromotionDecision:
    """Whether to promote the candidate, why, and the numbers behind it (`markdown`: a small table)."""

    promote: bool
    reason: str
    metric: str
    candidate_score: float
    current_score: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    markdown: str
    split: str = "test"
    tolerance: float = 0.0
    n_patients: int = 0
    store_content_hash: str | None = None
    candidate_sha256: str | None = None
    current_sha256: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (NaN as null), as written to promotion.json."""
        return to_jsonable(asdict(self))


def _check_split(split: str) -> None:
    if split not in SPLIT_CODES:
        raise PromotionError(f"unknown split {split!r}; use {', '.join(SPLIT_CODES)}")


def _score_fixed(model: Any, meta: dict[str, Any], store: str, split: str, device: str) -> ModelScores:
    from medpipe.store import read_sample_table
    from medpipe.training.engine import predict

    task = Task(meta["task"])
    result = predict(model, store, split, task=task, device=device)
    table = read_sample_table(store)
    rows = np.asarray(result["indices"], dtype=np.int64)
    patients = np.asarray(table["patient"], dtype=object)[rows]
    if task is Task.classify:
        keep = result["y_true"] >= 0
        return ModelScores(task, rows, patients, np.asarray(result["y_true"], np.int64),
                           np.asarray(result["y_prob"], np.float64)).subset(keep)
    keep = np.asarray(table["has_mask"], dtype=bool)[rows]
    num_classes = max(2, int(meta.get("num_outputs", 2)))
    dice = np.zeros(rows.size)
    if keep.any():
        scored = segmentation_metrics(result["masks_pred"][keep], result["masks_true"][keep], num_classes=num_classes)
        dice[keep] = scored["per_sample"]["dice"]
    return ModelScores(task, rows, patients, dice=dice).subset(keep)


def _score_volumes(run: str | Path, store: str, split: str, device: str) -> ModelScores:
    from medpipe.evaluation.volume_eval import TOLERANCE_MM
    from medpipe.evaluation.volume_metrics import case_metrics
    from medpipe.ingest.records import ArchiveRecord
    from medpipe.predict import iter_case_predictions, load_volume_model, split_cases
    from medpipe.store import open_store, read_archive_image, read_sample_table

    vm = load_volume_model(run, device)
    root = open_store(store)
    table = read_sample_table(root)
    indices = split_cases(table, split)
    indices = indices[np.asarray(table["has_mask"], dtype=bool)[indices]]
    dice = []
    for case, pred in iter_case_predictions(root, indices, vm):
        _, mask, archive = read_archive_image(root, case.unit)
        assert mask is not None  # has_mask
        spacing = ArchiveRecord.from_attrs(archive).spacing
        dice.append(case_metrics(pred, mask[0], spacing, vm.num_classes, TOLERANCE_MM)["dice"])
    rows = np.asarray(indices, dtype=np.int64)
    return ModelScores(Task.segment, rows, np.asarray(table["patient"], dtype=object)[rows],
                       dice=np.asarray(dice, dtype=np.float64))


def score_model(run: str | Path, store: str, split: str = "test", device: str = "auto") -> ModelScores:
    """Score a training run (its best.pt) on `split` of STORE, sample by sample (cases without a label or mask
    are left out). The caller checks that the model fits the store (`incomparable_reason`)."""
    _check_split(split)
    checkpoint, _ = resolve_checkpoint(run)
    model, meta = load_model(checkpoint)
    if is_volumes_checkpoint(meta):
        return _score_volumes(run, store, split, device)
    return _score_fixed(model, meta, store, split, device)


def incomparable_reason(meta: dict[str, Any], attrs: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot be scored on a store (another task, classes, layout, sample shape or
    preprocessing); None when it can."""
    from medpipe.predict import preprocessing_warnings
    from medpipe.volumes import store_layout

    layout = store_layout(attrs)
    volumes = is_volumes_checkpoint(meta)
    if volumes != (layout == "volumes"):
        return f"it is a {'volumes' if volumes else 'fixed'}-layout model and the store has the {layout} layout"
    classes = list(attrs.get("classes") or [])
    if Task(meta["task"]) is Task.classify and list(meta.get("classes") or []) != classes:
        return f"its classes ({', '.join(map(str, meta.get('classes') or []))}) are not the store's " \
               f"({', '.join(classes)})"
    if layout != "volumes" and list(meta.get("sample_shape") or []) != list(attrs.get("sample_shape") or []):
        return f"its input shape {meta.get('sample_shape')} is not the store's sample shape {attrs.get('sample_shape')}"
    if layout == "volumes" and meta.get("store_content_hash") != attrs.get("content_hash"):
        notes = preprocessing_warnings(attrs, meta, same_store=False)
        if notes:
            return f"it was trained on data prepared otherwise ({notes[0]})"
    return None


def paired_patient_bootstrap(a: ModelScores, b: ModelScores | None, n_boot: int = 1000, seed: int = 0
                             ) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of a's primary metric, b's and a - b, from the same `n_boot` resamples of
    patients with replacement (all samples of a drawn patient enter together). Keys "a", "b", "diff"."""
    _, codes = np.unique(a.patients.astype(str), return_inverse=True)
    n_patients = int(codes.max()) + 1 if codes.size else 0
    if n_patients == 0:
        raise PromotionError("no scored sample to bootstrap")

    def take(drawn: np.ndarray) -> np.ndarray:
        weights = np.bincount(drawn, minlength=n_patients)[codes]
        return np.repeat(np.arange(codes.size), weights)

    patients = np.arange(n_patients)
    stats = {"a": lambda d: a.primary(take(d))}
    if b is not None:
        stats["b"] = lambda d: b.primary(take(d))
        stats["diff"] = lambda d: a.primary(take(d)) - b.primary(take(d))
    # one seed for all: bootstrap_ci draws the same patient resamples for each statistic (paired)
    return {name: bootstrap_ci(fn, patients, n_boot=n_boot, seed=seed) for name, fn in stats.items()}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _with_ci(value: float | None, ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None or any(math.isnan(v) for v in ci):
        return _fmt(value, signed)
    return f"{_fmt(value, signed)} ({_fmt(ci[0], signed)} to {_fmt(ci[1], signed)})"


def _markdown(metric: str, models: dict[str, dict[str, Any]], promote: bool, reason: str, n: int, n_patients: int,
              split: str, n_boot: int) -> str:
    title = METRIC_TITLES[metric]
    accuracy = any("accuracy" in m for m in models.values())
    head = f"| model | checkpoint | {title} (95% CI) |" + (" accuracy |" if accuracy else "") + \
        " difference vs current (95% CI) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in models.items():
        diff = _with_ci(m.get("diff"), m.get("diff_ci"), signed=True) if "diff" in m else ""
        lines.append(f"| {name} | `{str(m.get('sha256') or '')[:12]}` | {_with_ci(m.get('score'), m.get('ci'))} |"
                     + (f" {_fmt(m.get('accuracy'))} |" if accuracy else "") + f" {diff} |")
    lines.append("")
    lines.append(f"**{'Promote' if promote else 'Keep the current model'}**: {reason}")
    lines.append("")
    lines.append(f"{n} scored sample(s) of {n_patients} patient(s), {split} split; 95% CIs: paired percentile "
                 f"bootstrap over patients ({n_boot} resamples).")
    return "\n".join(lines)


def _decide(cand: float, cur: float | None, tolerance: float, metric: str) -> tuple[bool, str]:
    """The rule on point estimates: (promote, one-line reason)."""
    title = METRIC_TITLES[metric]
    if cur is None:
        return True, "there is no current model: the first candidate is promoted"
    if math.isnan(cand) or math.isnan(cur):
        return False, (f"{title} is undefined on this split for the {'candidate' if math.isnan(cand) else 'current'} "
                       "model (e.g. one class only): the models cannot be compared")
    if cand >= cur - tolerance:
        return True, (f"candidate {title} {cand:.3f} >= current {cur:.3f} - tolerance {tolerance:g}: not worse on the "
                      "fixed test split")
    return False, (f"candidate {title} {cand:.3f} < current {cur:.3f} - tolerance {tolerance:g}: worse on the fixed "
                   "test split")


def _load(run: str | Path) -> tuple[dict[str, Any], str]:
    checkpoint, _ = resolve_checkpoint(run)
    _, meta = load_model(checkpoint)
    return meta, file_sha256(checkpoint)


def _current_problem(cur_meta: dict[str, Any], task: Task, attrs: dict[str, Any]) -> str | None:
    if Task(cur_meta["task"]) is not task:
        return f"it is a {Task(cur_meta['task']).value} model and the candidate a {task.value} model"
    return incomparable_reason(cur_meta, attrs)


def _model_row(scores: ModelScores, sha: str, metric: str, classes: list[str], ci: tuple[float, float]
               ) -> dict[str, Any]:
    head = scores.headline(classes) if scores.n else {metric: math.nan}
    return {"sha256": sha, "n": scores.n, "score": head[metric], "ci": ci,
            **({"accuracy": head["accuracy"]} if "accuracy" in head else {})}


def compare_models(store: str, candidate: str, current: str | None, out_dir: str, *, split: str = "test",
                   tolerance: float = 0.0, n_boot: int = 1000, device: str = "auto") -> PromotionDecision:
    """Score the candidate (and the current model, when given and comparable) on `split` of STORE, decide by the
    promotion rule (module docstring) and write OUT_DIR/promotion.json; returns the decision."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise PromotionError(f"tolerance must be a number >= 0, got {tolerance}")
    if n_boot < 1:
        raise PromotionError(f"n_boot must be >= 1, got {n_boot}")
    _check_split(split)
    attrs = store_attrs(store)
    if not attrs or not attrs.get("complete"):
        raise PromotionError(f"{store} is not a complete medpipe store")
    cand_meta, cand_sha = _load(candidate)
    task = Task(cand_meta["task"])
    metric = METRIC_NAMES[task]
    cur_meta, cur_sha = _load(current) if current is not None else (None, None)
    other_store = cand_meta.get("store_content_hash") != attrs.get("content_hash")
    cand_problem = incomparable_reason(cand_meta, attrs) if other_store else None
    if cand_problem is not None:  # trained on another store and does not even fit this one: nothing to score
        reason = (f"the candidate was trained on another store content and cannot be scored on this store "
                  f"({cand_problem}): it is not promoted")
        decision = PromotionDecision(
            promote=False, reason=reason, metric=metric, candidate_score=math.nan, current_score=None, diff=None,
            ci_low=None, ci_high=None, n=0, markdown=f"**Keep the current model**: {reason}", split=split,
            tolerance=tolerance, store_content_hash=attrs.get("content_hash"), candidate_sha256=cand_sha,
            current_sha256=cur_sha)
        return _write(decision, out_dir)
    cand_scores = score_model(candidate, store, split, device)
    if cand_scores.n == 0:
        raise PromotionError(f"the {split} split of {store} has no labelled sample or case with a mask: nothing to "
                             "score the models on")
    cur_problem = None if cur_meta is None else _current_problem(cur_meta, task, attrs)
    cur_scores = None
    if current is not None and cur_problem is None and not other_store:
        cur_scores = score_model(current, store, split, device)
        if not np.array_equal(cur_scores.rows, cand_scores.rows):
            raise PromotionError("the two models were scored on different samples of the split")
    intervals = paired_patient_bootstrap(cand_scores, cur_scores, n_boot=n_boot)
    classes = list(attrs.get("classes") or [])
    models = {"candidate": _model_row(cand_scores, cand_sha, metric, classes, intervals["a"])}
    cur_value = diff = None
    diff_ci: tuple[float, float] | None = None
    if cur_scores is not None:
        assert cur_sha is not None
        models["current"] = _model_row(cur_scores, cur_sha, metric, classes, intervals["b"])
        cur_value = models["current"]["score"]
        diff, diff_ci = models["candidate"]["score"] - cur_value, intervals["diff"]
        models["candidate"].update(diff=diff, diff_ci=diff_ci)

    if other_store:
        promote, reason = False, (
            f"the candidate was trained on store content {str(cand_meta.get('store_content_hash'))[:12]}…, not this "
            f"store's {str(attrs.get('content_hash'))[:12]}…: it is not promoted (retrain it on this store)")
    elif cur_problem is not None:
        promote, reason = True, (f"the current model cannot be scored on this store ({cur_problem}): the candidate "
                                 "is promoted without a comparison")
    else:
        promote, reason = _decide(models["candidate"]["score"], cur_value, tolerance, metric)
    n_patients = len({str(p) for p in cand_scores.patients})
    decision = PromotionDecision(
        promote=promote, reason=reason, metric=metric, candidate_score=models["candidate"]["score"],
        current_score=cur_value, diff=diff, ci_low=None if diff_ci is None else diff_ci[0],
        ci_high=None if diff_ci is None else diff_ci[1], n=cand_scores.n,
        markdown=_markdown(metric, models, promote, reason, cand_scores.n, n_patients, split, n_boot),
        split=split, tolerance=tolerance, n_patients=n_patients, store_content_hash=attrs.get("content_hash"),
        candidate_sha256=cand_sha, current_sha256=cur_sha, models=models)
    return _write(decision, out_dir)


def _write(decision: PromotionDecision, out_dir: str | Path) -> PromotionDecision:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROMOTION_JSON).write_text(json.dumps(decision.to_dict(), indent=1) + "\n")
    return decision
