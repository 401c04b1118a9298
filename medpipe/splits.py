"""Patient-level train/val/test splits that never move a patient: a pure function of its keyed pseudonym.

A patient's split is read off a hash of its pseudonym (itself an HMAC of the patient identifier under the
de-identification key) and the split seed, mapped onto the configured fractions. So:
* adding or removing patients never moves an existing patient to another split;
* two stores of the same patients made with the same key and seed (a 2D and a 3D store) agree;
* every image of a patient lands in the patient's split.
Each patient is assigned independently, so label stratification holds in expectation only: with few patients a
split can end up without a class, or empty. `split_warnings` says so, loudly, and the run reports it.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from medpipe.config import SplitConfig

SPLIT_NAMES = ("train", "val", "test")


def split_of(patient: str, config: SplitConfig) -> int:
    """Split code (0 train, 1 val, 2 test) of one patient pseudonym."""
    digest = hashlib.sha256(f"medpipe-split\x00{config.seed}\x00{patient}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return 0 if u < config.train else 1 if u < config.train + config.val else 2


def split_patients(patients: Iterable[str], config: SplitConfig) -> dict[str, int]:
    """Split code of each patient pseudonym."""
    return {p: split_of(p, config) for p in sorted(set(patients))}


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


def split_warnings(split_of_patient: Mapping[str, int], strata: Mapping[str, int], config: SplitConfig,
                   classes: list[str]) -> list[str]:
    """Loud, non-identifying warnings: an empty split that was asked for, a labelled class missing from a split."""
    warnings = []
    fractions = {0: config.train, 1: config.val, 2: config.test}
    patients_in = Counter(split_of_patient.values())
    for code, name in enumerate(SPLIT_NAMES):
        if fractions[code] > 0 and patients_in[code] == 0 and split_of_patient:
            consequence = {1: "training will run without validation (no early stopping, no model selection)",
                           2: "there is no held-out test set: evaluate on another store",
                           0: "there is nothing to train on"}[code]
            warnings.append(f"the {name} split is empty ({len(split_of_patient)} patients, fraction "
                            f"{fractions[code]}): {consequence}")
    labelled = {s for s in strata.values() if s >= 0}
    for code, name in enumerate(SPLIT_NAMES):
        if patients_in[code] == 0:
            continue
        present = {strata[p] for p, c in split_of_patient.items() if c == code}
        missing = sorted(labelled - present)
        if missing:
            names = ", ".join(classes[k] if 0 <= k < len(classes) else str(k) for k in missing)
            warnings.append(f"the {name} split has no patient of class {names}")
    return warnings
