"""Thin Prefect tasks of the pipeline flow: publishing to and fetching from OUTPUT (I/O: retried with exponential
backoff), the ledger, the archive's input tags, promotion and prediction. Results carry URLs, keys and numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from medpipe.pipeline import incremental, keys, ledger, publish
from tasks.ingest import safe
from tasks.options import IO_TASK, STEP_TASK


@task(name="publish", **IO_TASK)
def publish_dir(local_dir: str, dest_url: str, skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy a scratch folder to OUTPUT; returns the URLs written."""
    return publish.publish_dir(local_dir, dest_url, skip_suffixes)


@task(name="fetch", **IO_TASK)
def fetch_dir(src_url: str, local_dir: str) -> str:
    """Copy a published folder from OUTPUT into scratch; returns the local folder."""
    return str(publish.fetch_dir(src_url, local_dir))


@task(name="write-json", **IO_TASK)
def write_json(url: str, payload: Any) -> str:
    return publish.write_json_url(url, payload)


@task(name="read-json", **IO_TASK)
def read_json(url: str) -> Any | None:
    return publish.read_json_url(url)


@task(name="ledger-lookup", **IO_TASK)
def find_done(output: str, stage: str, key: str) -> ledger.LedgerEntry | None:
    """The ledger entry of `key` when its outputs still exist (the stage is skipped), else None."""
    return ledger.find_done(output, stage, key)


@task(name="ledger-latest", **IO_TASK)
def latest_with(output: str, stage: str, field_name: str, value: Any) -> ledger.LedgerEntry | None:
    """The most recent ledger entry of `stage` whose summary has `field_name` == `value` (outputs present)."""
    return ledger.latest_with(output, stage, field_name, value)


@task(name="ledger-record", **IO_TASK)
def record(output: str, stage: str, key: str, outputs: list[str], summary: dict[str, Any]) -> ledger.LedgerEntry:
    return ledger.record(output, stage, key, outputs, summary)


@task(name="archive-tags", **IO_TASK)
def archive_tags(store: str) -> dict[str, str]:
    """unit id -> input tag of the store's archive images (before and after ingest: what was newly archived)."""
    return incremental.archive_tags(store)


@task(name="listing-fingerprint", **IO_TASK)
@safe("listing-fingerprint")
def listing_fingerprint(url: str) -> str:
    return keys.listing_fingerprint(url)


@task(name="store-content-hash", **IO_TASK)
def store_content_hash(store: str) -> str:
    """The content hash of a complete store; StoreError (one line) otherwise."""
    from medpipe.store import StoreError, store_attrs

    attrs = store_attrs(store)
    if not attrs.get("complete") or not attrs.get("content_hash"):
        raise StoreError(f"{store} is not a complete medpipe store: run the ingest stage first")
    return str(attrs["content_hash"])


@task(name="checkpoint-sha256", **STEP_TASK)
def checkpoint_sha256(path: str) -> str:
    from medpipe.training.checkpoints import file_sha256

    return file_sha256(path)


@task(name="compare-models", **STEP_TASK)
@safe("compare-models")
def compare_models(store: str, candidate: str, current: str | None, out_dir: str, split: str, tolerance: float,
                   n_boot: int, device: str) -> dict[str, Any]:
    """medpipe.promotion.compare_models (writes OUT_DIR/promotion.json); returns the decision as a plain dict."""
    from medpipe.promotion import compare_models as compare

    return compare(store, candidate, current, out_dir, split=split, tolerance=tolerance, n_boot=n_boot,
                   device=device).to_dict()


@task(name="predict-new-studies", **STEP_TASK)
@safe("predict-new-studies")
def predict_new_studies(source: str, model_dir: str, out_dir: str, store: str, key_secret: str | None,
                        device: str) -> dict[str, Any]:
    """medpipe.batch_predict.predict_new_studies into a scratch folder (which may hold the model's earlier
    predictions: only new studies are predicted); `store` is the model's training store. Returns its summary."""
    from medpipe.batch_predict import predict_new_studies as predict

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return predict(source, model_dir, out_dir, store=store, key_secret=key_secret, device=device)
