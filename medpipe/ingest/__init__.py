"""Ingestion steps: discover -> scan -> plan units -> archive -> lay out -> assemble -> finalize.

Each step is a plain function over references (store URL, file lists, unit descriptions); `tasks/ingest.py` wraps
them as Prefect tasks and `flows/ingest.py` composes them, mapping scan/archive/assemble over shards.
"""
