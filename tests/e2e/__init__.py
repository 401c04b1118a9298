"""End-to-end proof on real components: Prefect server, Dask scheduler and workers, moto S3 and served flows, each a
separate process on loopback (see docs/e2e.md)."""
