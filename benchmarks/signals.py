"""Signal benchmarks (issue 12): windows/s of ingestion and of the training loader, each against a baseline
measured in the same run.

  ingest_vs_bare_windowing    `run_signal_ingest_steps` (serial: one worker, in-process) over the demo's ECG
                              records vs a bare loop over the same files: read with wfdb / pyedflib directly,
                              resample with scipy, cut windows into one numpy array in memory (no de-identification,
                              checks, store or splits); windows/s over windows/s
  loader_vs_in_memory         the training loader (SignalWindowDataset + DataLoader, 0 workers, the training
                              sampler's batches of the train split: whole shards shuffled in windows of 8, the store
                              read uncached) vs indexing an in-memory tensor of the same windows with the same
                              batches (`tensor[idx]`); windows/s over windows/s
  loader_cached_vs_in_memory  the same with the split held in memory (the default when it fits; a full shuffle)

Usage: python benchmarks/signals.py [--patients 100] [--records 4] [--seconds 30] [--repeats 3] [--out DIR] [--json]
With --json the last stdout line is one JSON object of the ratios and the rates behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medpipe.deid import DEMO_KEY, KEY_ENV_VAR, resolve_key  # noqa: E402
from medpipe.ingest.lock import acquire_lock, new_run_id, release_lock  # noqa: E402
from medpipe.ingest.pipeline import direct_driver, serial_mapper  # noqa: E402
from medpipe.signals.config import SignalIngestConfig  # noqa: E402
from medpipe.signals.demo import SignalDemoSpec, generate_demo_signals  # noqa: E402
from medpipe.signals.ingest import prepare_signal_ingest, run_signal_ingest_steps  # noqa: E402
from medpipe.signals.windows import cut_windows, resample_signals, window_starts  # noqa: E402

BATCH = 64


def best_time(repeats: int, fn: Callable[[], Any], before: Callable[[], None] = lambda: None) -> float:
    """Best wall time of `repeats` runs of fn (`before` runs untimed before each)."""
    best = float("inf")
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bare_windowing(source: Path, config: SignalIngestConfig) -> int:
    """Read every record with its library, resample, cut windows into memory; returns the window count."""
    import pyedflib
    import wfdb

    parts = []
    for path in sorted(source.rglob("*")):
        if path.suffix == ".hea":
            record = wfdb.rdrecord(str(path.with_suffix("")))
            signals, fs = record.p_signal.T.astype(np.float32), float(record.fs)
        elif path.suffix == ".edf":
            with pyedflib.EdfReader(str(path)) as reader:
                signals = np.stack([reader.readSignal(i) for i in range(reader.signals_in_file)]).astype(np.float32)
                fs = float(reader.getSampleFrequency(0))
        else:
            continue
        signals = resample_signals(signals, fs, config.rate_hz)
        starts = window_starts(signals.shape[1], config.window_samples, config.stride_samples, config.last_partial)
        parts.append(cut_windows(signals, starts, config.window_samples))
    return int(sum(len(p) for p in parts))


def ingest(source: Path, store: Path, config: SignalIngestConfig) -> dict[str, Any]:
    """The signal ingest's steps, serially, holding the store's lock as the flow does."""
    key = resolve_key()
    run_id = new_run_id()
    acquire_lock(str(store), run_id)
    try:
        run = prepare_signal_ingest(str(source), str(store), config, key, run_id)
        return run_signal_ingest_steps(run, key, serial_mapper, direct_driver)
    finally:
        release_lock(str(store), run_id)


def loader_rate(store: Path, cache: bool, repeats: int) -> tuple[float, float, int]:
    """(loader windows/s, in-memory windows/s, windows) of one epoch over the train split: the training sampler's
    batches, a fresh dataset per timed epoch (no shard left over from an earlier run), best of `repeats`."""
    import torch
    from torch.utils.data import DataLoader

    from medpipe.signals.data import SignalWindowDataset, pass_batch
    from medpipe.task import Task
    from medpipe.training.data import BlockShuffleSampler

    def dataset() -> SignalWindowDataset:
        return SignalWindowDataset(str(store), "train", Task.classify, cache=cache)

    first = dataset()
    n = len(first)
    # the training loader's batches (medpipe.signals.train): a full shuffle of a cached split, whole shards
    # shuffled in windows of 8 otherwise
    sampler = BlockShuffleSampler(first, BATCH, seed=0, window=8, shuffle=True, drop_last=False)  # type: ignore[arg-type]
    batches = list(sampler)
    memory = torch.from_numpy(first.read(np.arange(n)))
    labels = torch.from_numpy(first.labels_all[first.indices])
    fresh: list[SignalWindowDataset] = []

    def through_loader() -> None:
        loader = DataLoader(fresh[-1], batch_sampler=batches, num_workers=0, collate_fn=pass_batch)
        for batch in loader:
            batch["image"].sum()

    def in_memory() -> None:
        for idx in batches:
            index = torch.as_tensor(idx)
            memory[index].sum()
            labels[index]

    loader_s = best_time(repeats, through_loader, lambda: fresh.append(dataset()))
    return n / loader_s, n / best_time(repeats, in_memory), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100, help="patients (the train split spans ~20 shards)")
    parser.add_argument("--records", type=int, default=4, help="records per patient")
    parser.add_argument("--seconds", type=float, default=30.0, help="record length")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (the best counts)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object of all figures")
    args = parser.parse_args()
    if args.patients < 2 or args.records < 1 or args.seconds < 10 or args.repeats < 1:
        parser.error("need --patients >= 2, --records >= 1, --seconds >= 10, --repeats >= 1")
    os.environ.setdefault(KEY_ENV_VAR, DEMO_KEY)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="medpipe-signal-bench-"))
    try:
        source = out / "source"
        if not (source / "labels.csv").exists():
            generate_demo_signals(source, SignalDemoSpec(patients=args.patients, records_per_patient=args.records,
                                                         seconds=args.seconds))
        config = SignalIngestConfig()
        store = out / "signals.zarr"
        windows = bare_windowing(source, config)  # warm page cache and imports
        bare_s = best_time(args.repeats, lambda: bare_windowing(source, config))
        summary: dict[str, Any] = {}
        ingest_s = best_time(args.repeats, lambda: summary.update(ingest(source, store, config)),
                             lambda: shutil.rmtree(store, ignore_errors=True))
        stored = summary["counts"]["windows"]
        fig = {"bare_windows_per_s": windows / bare_s, "ingest_windows_per_s": stored / ingest_s,
               "windows": float(stored)}
        fig["ingest_vs_bare_windowing"] = fig["ingest_windows_per_s"] / fig["bare_windows_per_s"]
        loader, memory, n = loader_rate(store, cache=False, repeats=args.repeats)
        fig.update(loader_windows_per_s=loader, in_memory_windows_per_s=memory, loader_vs_in_memory=loader / memory)
        cached, memory2, _ = loader_rate(store, cache=True, repeats=args.repeats)
        fig.update(loader_cached_windows_per_s=cached, loader_cached_vs_in_memory=cached / memory2)
        print(f"ingest_vs_bare_windowing     {fig['ingest_vs_bare_windowing']:.2f}x  ({fig['ingest_windows_per_s']:.0f} "
              f"vs {fig['bare_windows_per_s']:.0f} windows/s; {stored} windows of {config.window_s:g} s, "
              f"{args.patients * args.records} records)")
        print(f"loader_vs_in_memory          {fig['loader_vs_in_memory']:.2f}x  ({loader:.0f} vs {memory:.0f} "
              f"windows/s, train split {n} windows, batches of {BATCH}, store read uncached)")
        print(f"loader_cached_vs_in_memory   {fig['loader_cached_vs_in_memory']:.2f}x  ({cached:.0f} vs "
              f"{memory2:.0f} windows/s, split held in memory)")
        if args.json:
            print(json.dumps({k: round(float(v), 4) for k, v in sorted(fig.items())}))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
