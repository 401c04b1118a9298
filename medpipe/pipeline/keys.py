"""Stage keys: a sha256 of everything a stage's result depends on, and nothing else.

    key(stage) = sha256(stage, STAGE_VERSIONS[stage], store content_hash, the stage's lineage config,
                        the keys of the stages it depends on, extra inputs (e.g. the predicted source's listing))

Runtime settings (workers, scheduler, device, data-loader workers, the scratch folder) are not part of a key: they
change where and how fast a stage runs, not what it produces. Bump a stage's version when its code changes what it
produces.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from medpipe.gan.config import GAN_RUNTIME_FIELDS
from medpipe.pipeline.params import PipelineParams
from medpipe.store import store_fs
from medpipe.training.config import RUNTIME_FIELDS

STAGE_VERSIONS: dict[str, int] = {"ingest": 1, "train": 1, "evaluate": 1, "augment": 1, "retrain": 1, "promote": 1,
                                  "predict": 1}
# What each stage's result is made from (its key includes theirs).
DEPENDS_ON: dict[str, tuple[str, ...]] = {"ingest": (), "train": ("ingest",), "evaluate": ("train",),
                                          "augment": ("ingest",), "retrain": ("ingest", "augment"),
                                          "promote": ("train", "retrain"), "predict": ("promote",)}
_EVAL_RUNTIME = frozenset({"device"})


def stage_key(stage: str, content_hash: str, config: Mapping[str, Any], dependencies: Mapping[str, str],
              extra: Mapping[str, Any] | None = None) -> str:
    """The key of one stage (64 hex characters); same inputs, same key, in any process."""
    payload = {"stage": stage, "version": STAGE_VERSIONS[stage], "store_content_hash": content_hash,
               "config": config, "dependencies": dict(sorted(dependencies.items())), "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lineage_config(stage: str, params: PipelineParams) -> dict[str, Any]:
    """The part of a stage's validated config its result depends on (runtime settings left out)."""
    cfg = params.config
    if stage == "ingest":
        return cfg.ingest.lineage_dict()
    if stage in ("train", "retrain"):
        section = cfg.train if stage == "train" else cfg.retrain
        return {k: v for k, v in section.to_dict().items() if k not in RUNTIME_FIELDS}
    if stage == "augment":
        augment = cfg.augment.to_dict()
        # epochs change the generator (unlike a resumption's view of them): only where/how fast it runs is left out
        augment["gan"] = {k: v for k, v in augment["gan"].items() if k not in GAN_RUNTIME_FIELDS - {"epochs"}}
        return augment
    if stage == "evaluate":
        return {k: v for k, v in cfg.evaluate.to_dict().items() if k not in _EVAL_RUNTIME}
    if stage == "promote":
        return {k: v for k, v in cfg.promote.to_dict().items() if k not in _EVAL_RUNTIME}
    if stage == "predict":
        return {}
    raise ValueError(f"unknown stage {stage!r}")


def listing_fingerprint(url: str) -> str:
    """sha256 of a folder's listing (relative path, size, modification stamp or ETag of every file): changes when
    a file is added, removed or rewritten. Only the hash is kept, never the paths (they can name patients)."""
    fs, root = store_fs(url)
    entries = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        entries.append([path[len(root):], int(info.get("size") or 0), str(stamp)])
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
