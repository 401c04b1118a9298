"""Real DICOM files for tests: pydicom's own test corpus, with an oracle computed by plain pydicom (no medpipe), and
a real CT series (the GE head CT of dcm_qa_ct, tests/data/dcm_qa_ct, BSD-2).

With the optional ``pydicom-data`` package installed, ``get_testdata_files()`` also lists its 68 larger files
(offline, from the installed wheel).
"""

from __future__ import annotations

import shutil
import tarfile
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files

GE_CT_TARBALL = Path(__file__).parent / "data" / "dcm_qa_ct" / "GE.tar.xz"
_NOT_DICOM_SUFFIXES = (".dump", ".json", ".txt", ".gz", ".icc", ".py", ".pyc", ".bz2", ".zip", ".xml", ".png")


def copy_pydicom_corpus(dest: Path) -> dict:
    """Copy pydicom's DICOM test files into ``dest`` with flat unique names; return a pydicom-only oracle.

    Oracle keys: ``files`` (number copied), ``names`` (copied file names), ``decodable`` (set of distinct
    SOPInstanceUIDs whose ``ds.pixel_array`` decodes), ``decodable_files`` (names of those files),
    ``not_decodable`` (names of DICOM files whose pixels do not decode or that hold none).
    """
    dest.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    decodable: set[str] = set()
    decodable_files: list[str] = []
    not_decodable: list[str] = []
    for source in sorted(get_testdata_files()):
        src = Path(source)
        if src.name.lower().endswith(_NOT_DICOM_SUFFIXES) or not src.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(src)
            except Exception:  # noqa: BLE001 - not DICOM (or not parseable): not part of the corpus
                continue
            name = f"{len(names):03d}_{src.parent.name}_{src.name}"
            shutil.copyfile(src, dest / name)
            names.append(name)
            try:
                if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                    raise ValueError("no pixels")
                _ = ds.pixel_array
                uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
                if uid:
                    decodable.add(str(uid))
                    decodable_files.append(name)
            except Exception:  # noqa: BLE001 - any decode failure: not in the decodable set
                not_decodable.append(name)
    return {"files": len(names), "names": names, "decodable": decodable, "decodable_files": decodable_files,
            "not_decodable": not_decodable}


def unpack_ge_ct(folder: Path) -> Path:
    """The 28 files of dcm_qa_ct's GE head CT (tests/data/dcm_qa_ct/README.md) under FOLDER/GE; returns that folder."""
    with tarfile.open(GE_CT_TARBALL) as tar:
        tar.extractall(folder, filter="data")
    return folder / "GE"
