"""The whole pipeline as one run: ingest -> train -> evaluate -> augment -> retrain -> promote -> predict.

Modules, one job each: `params` (the validated parameters), `keys` (stage keys: what a stage's result depends on),
`ledger` (which keys already have published outputs), `publish` (scratch <-> OUTPUT copies), `incremental` (what an
ingest newly archived), `lineage` (store -> checkpoints -> reports -> predictions), `summary` (markdown and table),
`progress` (stage announcements for the CLI). The Prefect flow is `flows/pipeline.py`; docs/pipeline.md.
"""
