"""Ingestion streams: a CT corpus several times larger than what a Dask worker has for data completes under the
worker's memory limit (processes=True, Dask's memory limit set), with no pause, no restart and nothing lost.

A worker idles at ~430-500 MiB RSS after importing the ingest code (torch and MONAI alone are ~330 MiB; it varies
with the machine and a fresh checkout), so the limit is set from the idle RSS measured on this machine first
(idle + DATA_HEADROOM = the pause threshold), and the corpus is sized against the worker's headroom (pause threshold
minus its idle RSS, measured again), which is what data can use: 3x that headroom. `python benchmarks/scaling.py` runs the same measurement at 3x the whole limit
(docs/scaling.md has its numbers)."""

from __future__ import annotations

import pytest

from benchmarks.scaling import PAUSE_FRACTION, ct_config, ingest_measured, limited_cluster, make_ct_corpus

pytestmark = pytest.mark.slow

MIB = 2**20
DATA_HEADROOM = 80 * MIB  # what a worker has for data under Dask's pause threshold (80 % of its limit)
SLICE, SLICES = 256, 32  # 4 MiB series: the unit a worker holds at a time


def test_a_corpus_three_times_the_worker_headroom_ingests_under_the_limit(tmp_path, deid_key):
    with limited_cluster(2**30, workers=1) as probe:
        idle = probe.idle_rss()
    with limited_cluster(int((idle + DATA_HEADROOM) / PAUSE_FRACTION), workers=1) as cluster:
        headroom = cluster.headroom()
        assert headroom > 32 * MIB, f"a worker idles at {cluster.idle_rss() / MIB:.0f} MiB: no room under the limit"
        corpus = make_ct_corpus(tmp_path / "ct", 3 * headroom, SLICE, SLICES)
        run = ingest_measured(cluster, corpus, str(tmp_path / "store.zarr"), ct_config(SLICES, SLICE))

    assert corpus.bytes >= 3 * headroom and corpus.series >= 20
    assert run.ingested == run.discovered == corpus.files + corpus.series  # every slice, and every series' mask
    assert not run.restarted, "a worker was restarted (Dask's terminate threshold, or a crash)"
    assert not run.paused, "a worker was paused at Dask's 80 % threshold"
    peak = max(run.peak_rss)
    assert peak < run.pause_bytes, f"peak RSS {peak / MIB:.0f} MiB >= pause threshold {run.pause_bytes / MIB:.0f} MiB"
