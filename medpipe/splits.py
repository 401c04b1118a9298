"""Patient-level, label-stratified, deterministic train/val/test splits."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from medpipe.config import SplitConfig

SPLIT_NAMES = ("train", "val", "test")


def patient_labels(patients: list[str], labels: list[int]) -> dict[str, int]:
    """Each patient's stratum: its most frequent label (ties: the smallest), -1 when it has none."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for patient, label in zip(patients, labels):
        counts[patient][label] += 0 if label < 0 else 1
    strata = {}
    for patient, c in counts.items():
        labelled = {k: v for k, v in c.items() if k >= 0}
        strata[patient] = min(labelled, key=lambda k: (-labelled[k], k)) if labelled else -1
    return strata


def split_patients(strata: dict[str, int], config: SplitConfig) -> dict[str, int]:
    """Assign each patient a split code (0 train, 1 val, 2 test), stratified by its label.

    Deterministic for the same patients and seed: patients are sorted, then shuffled by a seeded generator
    within each stratum. Small strata keep at least one training patient.
    """
    rng = np.random.default_rng(config.seed)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(strata):
        by_stratum[strata[patient]].append(patient)
    assignment: dict[str, int] = {}
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_test = int(round(n * config.test))
        n_val = int(round(n * config.val))
        if n_test + n_val >= n:  # keep a training patient in every stratum
            n_val = max(0, min(n_val, n - 1 - n_test)) if n > 1 else 0
            n_test = max(0, min(n_test, n - 1 - n_val)) if n > 1 else 0
        for i, patient in enumerate(order):
            assignment[patient] = 2 if i < n_test else 1 if i < n_test + n_val else 0
    return assignment
