"""Real-DICOM coverage: medpipe vs dcm2niix on pydicom's test corpus (plus pydicom-data when installed).

Counts, in one run on the same files: DICOM files, distinct SOPInstanceUIDs that plain pydicom decodes (the
oracle), what dcm2niix converts (NIfTI outputs; files it used), and what medpipe ingests (archive images, volumes,
files, and oracle instances covered). Needs the `dcm2niix` PyPI package for its column (`pip install dcm2niix`).

Usage: python benchmarks/corpus.py [--out bench-output/corpus]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import timed  # noqa: E402,F401  (sets the benchmark key and Prefect env)
from medpipe.config import IngestConfig, PreprocessConfig  # noqa: E402
from medpipe.deid import Pseudonymizer, resolve_key  # noqa: E402
from medpipe.store import read_json  # noqa: E402
from tests.dicom_corpus import copy_pydicom_corpus  # noqa: E402


def run_dcm2niix(source: Path, out: Path) -> dict[str, int] | None:
    """dcm2niix over the folder: outputs written and the DICOM files it reports converting (None if absent)."""
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "-z", "n", "-f", "%s_%r_%e_%p", "-o", str(out), str(source)],
                          capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    converted = sum(int(n) for n in re.findall(r"Convert (\d+) DICOM", log))
    return {"outputs": len(list(out.glob("*.nii"))), "files_converted": converted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-output/corpus")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    source = out / "dicom"
    oracle = copy_pydicom_corpus(source)
    dcm = run_dcm2niix(source, out / "dcm2niix")

    from flows.ingest import run_ingest
    from flows.runtime import shared_api_server  # noqa: F401

    store = out / "corpus.zarr"
    result = run_ingest(str(source), str(store), IngestConfig(preprocess=PreprocessConfig(kind="2d", shape=(32, 32))))
    pseudonyms = Pseudonymizer(resolve_key())
    quarantined = {q["source_hash"] for q in read_json(str(store), "reports/quarantine.json")}
    import pydicom

    files_of: dict[str, list[str]] = defaultdict(list)
    for name in oracle["decodable_files"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source / name, stop_before_pixels=True)
        files_of[str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID"))].append(name)
    covered = sum(1 for names in files_of.values() if any(pseudonyms.path(n) not in quarantined for n in names))
    assembly = result["assembly"]
    print(f"DICOM files {oracle['files']}; distinct instances pydicom decodes: {len(oracle['decodable'])}")
    if dcm is None:
        print("dcm2niix: not installed (pip install dcm2niix)")
    else:
        print(f"dcm2niix: {dcm['files_converted']} files converted into {dcm['outputs']} NIfTI images/volumes")
    print(f"medpipe:  {result['counts']['ingested']} files ingested into {result['archive_images']} archive images "
          f"({assembly['volumes']} volumes, {assembly['images_2d']} 2D); {covered} of {len(files_of)} decodable "
          f"instances covered; quarantined {result['quarantine_reasons']}")


if __name__ == "__main__":
    main()
