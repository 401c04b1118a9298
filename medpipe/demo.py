"""Built-in deterministic demo dataset: a fake hospital export full of fake PHI.

``generate_demo_dataset(out, DemoSpec(...))`` writes a folder that looks like what a
research team receives from a PACS export plus a few loose files, small enough for
tests and scalable to tens of thousands of files for benchmarks::

    OUT/
      labels.csv               path,label,mask,patient_id  (none / lesion)
      labels_multiclass.csv    same rows, classes none / small / large
      xray/<PATIENT_DIR>/<study>/<image>.dcm          2D DX, uint16 12-bit, MONOCHROME2
      png/<PATIENT_DIR>/<study>/<image>.png           2D 8-bit grayscale, no header
      ct/<PATIENT_DIR>/<study>/<series>/<slice>.dcm   3D CT, int16, RescaleIntercept -1024
      masks/<PATIENT_DIR>_<study>_<series>.nii.gz     uint8 lesion mask of one CT series

``<PATIENT_DIR>`` is ``SURNAME_GIVEN_PATIENTID`` (e.g. ``DOE_JOHN_48213977``), so
identifying information also lives in paths.

Image model
-----------
The images are meant to be hard enough that a threshold or intensity statistics do not solve
them, so that evaluation against baselines means something (see docs/evaluation.md).

* **2D (X-ray DICOM and PNG)**: a chest drawn per patient (body size/shape, two lungs of
  per-patient size and position, mediastinum, diaphragm, ribs) with a per-patient intensity
  gain ``XRAY_GAIN``, offset ``XRAY_OFFSET`` and pixel-noise sd ``XRAY_NOISE`` (fraction of full
  scale). Each image: a small random shift, +-3 % gain jitter, smooth clutter (sd
  ``XRAY_CLUTTER`` x noise sd), 1-5 vessels seen end-on (bright round dots, radius 1.5-3.5 px,
  contrast ``XRAY_VESSEL_CNR`` x noise sd) and, in half of the images, an elongated lesion-sized
  structure (rib crossing / oblique vessel, contrast ``XRAY_MIMIC_CNR``): these hard negatives
  are in ``none`` and ``lesion`` images alike. Images labelled ``lesion`` carry a round blob with
  a blurred edge, radius 6-14 px (at 128 px; scaled with ``image_size``), peak contrast
  ``XRAY_LESION_CNR`` x the image's noise sd, centred in the central 70 % of the image and in a
  lung when one of 20 draws lands there. Each study holds a balanced mix (half lesion, half none).
  Multiclass: radius < 10 px (scaled) is ``small``, otherwise ``large``.
* **X-ray DICOM encoding**: by global X-ray index ``k``, ``k % 6 == 1`` is RLE
  Lossless, ``k % 6 == 2`` JPEG 2000 Lossless, everything else Explicit VR Little
  Endian. All are lossless, so decoded pixels equal the rendered image.
* **CT**: per patient, a body ellipse with a subcutaneous fat layer (-100 HU), soft tissue
  (40 HU) and two lungs (-850 HU) that widen towards the lower slices, all shifted by a
  per-patient HU offset ``CT_HU_OFFSET``, in air (-1000 HU), with per-patient noise sd
  ``CT_NOISE_HU``. Every series has 2-5 vessels running along z through the soft tissue (bright
  dots in each slice, contrast 1.5-3 noise sd; hard negatives). Most series (all but global series
  index ``k % 5 == 1``) contain a lesion in soft tissue: a physically round ellipsoid of in-plane
  radius 4-9 voxels (at 64 px; scaled with ``ct_size``) and contrast ``CT_LESION_CNR`` x the noise
  sd, rendered with partial volume (occupancy supersampled 4x along z and 2x in-plane) and a
  slight in-plane blur; the mask is the soft-tissue voxels at least half inside it. Multiclass: in-plane radius
  < 6.5 voxels (scaled) is ``small``, otherwise ``large``. Slice files are named in
  a shuffled order (``IM0007.dcm`` is not the 7th slice along z) and
  ``InstanceNumber`` counts down from the top slice, so readers must sort by
  ``ImagePositionPatient`` along the slice normal.
* **Masks**: ``nifti_data = mask_zyx.transpose(2, 1, 0)`` with the RAS affine that
  corresponds to the DICOM (LPS) geometry of the series: voxel (i, j, k) = (column,
  row, slice sorted ascending along z) maps to RAS ``(-(x0 + i*dx), -(y0 + j*dy),
  z0 + k*dz)``. Series without lesion get an all-zero mask.

PHI
---
Every DICOM header carries fake but realistic identifiers (PatientName, PatientID,
PatientBirthDate, PatientSex, PatientAge, study/series/content dates and times,
InstitutionName, ReferringPhysicianName, AccessionNumber, StudyID, descriptions)
plus study/series/instance/frame-of-reference UIDs. A patient has the same name, ID
and birth date everywhere (X-ray and CT); AccessionNumber is unique per study. The
values written are returned in :attr:`DemoSummary.phi` so tests can scan outputs
for leaks.

Determinism
-----------
All randomness comes from ``numpy.random.default_rng`` seeded with ``(seed, tag,
indices...)`` and all UIDs are ``2.25.<128-bit hash of seed and indices>``; no
clock is read. The same spec therefore gives byte-identical files (given the same
library versions, since codecs and the DICOM writer are part of the bytes). Pixel
content depends only on the seed, the patient's anatomy (seeded by the patient index)
and the file's own (patient, study, image) indices; which X-ray is compressed and which CT series has a lesion follow the
global index, so they shift when per-study counts change.

``write_defective_files(out)`` writes one file of each bad-input kind (plus a few
unusual but valid files) for quarantine tests.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import functools
import gzip
import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

__all__ = ["DemoSpec", "DemoSummary", "generate_demo_dataset", "write_defective_files"]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

DX_PRESENTATION_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_IMAGE_SOP = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
US_IMAGE_SOP = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
XA_IMAGE_SOP = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
BASIC_TEXT_SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage

XRAY_PIXEL_SPACING = 0.5  # mm
CT_PIXEL_SPACING = 0.8  # mm
CT_SLICE_THICKNESS = 2.5  # mm
CT_BODY_HU = 40.0  # soft tissue before the per-patient offset
CT_AIR_HU = -1000.0
CT_LUNG_HU = -850.0
CT_FAT_HU = -100.0
CT_HU_OFFSET = (-25.0, 25.0)  # per-patient soft-tissue/lung/fat offset (scanner calibration, anatomy)
CT_NOISE_HU = (12.0, 22.0)  # per-patient noise sd
CT_LESION_CNR = (3.0, 4.5)  # lesion contrast / noise sd (before partial volume and blur); 1-2 sd left the
# demo U-Net at an empty prediction (Dice 0.00) within the default epochs on CPU: too hard to show what it adds
CT_VESSELS = (2, 6)  # vessels along z per series (hard negatives), contrast 1.5-3 noise sd
CT_RESCALE_INTERCEPT = -1024

XRAY_LESION_RADIUS = (6.0, 14.0)  # px at image_size 128
XRAY_SMALL_BELOW = 10.0  # px at image_size 128
CT_LESION_RADIUS = (4.0, 9.0)  # voxels at ct_size 64
CT_SMALL_BELOW = 6.5  # voxels at ct_size 64

XRAY_LESION_CNR = (6.0, 10.0)  # lesion peak contrast / the image's pixel-noise sd (before the 2x downsampling of training)
XRAY_NOISE = (0.02, 0.04)  # per-patient pixel-noise sd, fraction of full scale
XRAY_GAIN = (0.8, 1.15)  # per-patient intensity gain
XRAY_OFFSET = (-0.06, 0.06)  # per-patient intensity offset, fraction of full scale
XRAY_CLUTTER = 0.4  # sd of smooth anatomical clutter, in units of the pixel-noise sd
XRAY_VESSELS = (1, 6)  # end-on vessels per image: [low, high) count, radius 1.5-3.5 px at 128 px
XRAY_VESSEL_CNR = (4.0, 7.0)  # their contrast / pixel-noise sd
XRAY_MIMIC_CNR = (4.0, 7.0)  # contrast of those structures / pixel-noise sd
XRAY_MIMIC_P = 0.5  # chance per image of an elongated lesion-sized structure (rib crossing / oblique vessel)

_SURNAMES = (
    "DOE", "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
    "RODRIGUEZ", "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON",
    "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON", "WHITE",
    "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON", "WALKER", "YOUNG",
    "ALLEN", "KING", "WRIGHT", "SCOTT", "TORRES", "NGUYEN", "HILL", "FLORES", "GREEN",
    "ADAMS", "NELSON", "BAKER", "HALL", "RIVERA", "CAMPBELL", "MITCHELL", "CARTER",
    "ROBERTS", "MUELLER", "SCHMIDT", "ROSSI", "DUBOIS", "KOWALSKI", "NOVAK", "TANAKA",
    "KIM", "OKAFOR",
)
_GIVEN_MALE = (
    "JOHN", "JAMES", "ROBERT", "MICHAEL", "WILLIAM", "DAVID", "RICHARD", "JOSEPH",
    "THOMAS", "CHARLES", "DANIEL", "MATTHEW", "ANTHONY", "MARK", "PAUL", "STEVEN",
    "ANDREW", "KENNETH", "JOSHUA", "KEVIN", "BRIAN", "GEORGE", "EDWARD", "RONALD",
    "TIMOTHY", "JASON", "JEFFREY", "RYAN", "JACOB", "GARY", "NICHOLAS", "ERIC",
    "JONATHAN", "STEPHEN", "LARRY", "JUSTIN", "SCOTT", "BRANDON", "BENJAMIN", "SAMUEL",
)
_GIVEN_FEMALE = (
    "JANE", "MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN",
    "JESSICA", "SARAH", "KAREN", "LISA", "NANCY", "BETTY", "MARGARET", "SANDRA",
    "ASHLEY", "KIMBERLY", "EMILY", "DONNA", "MICHELLE", "CAROL", "AMANDA", "DOROTHY",
    "MELISSA", "DEBORAH", "STEPHANIE", "REBECCA", "SHARON", "LAURA", "CYNTHIA", "KATHLEEN",
    "AMY", "ANGELA", "SHIRLEY", "ANNA", "BRENDA", "PAMELA", "EMMA", "NICOLE",
)
_INSTITUTIONS = (
    "St. Elsewhere General Hospital",
    "Mercy Hope Medical Center",
    "Riverside Community Hospital",
    "Northgate University Clinic",
    "Lakeview Regional Medical Center",
)
_PHYSICIANS = (
    "HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES", "WELBY^MARCUS", "GREY^MEREDITH",
    "ROSS^DOUGLAS", "BAILEY^MIRANDA", "HAWKEYE^PIERCE",
)
_STUDY_DESCRIPTIONS = (
    "CHEST ROUTINE", "THORAX FOLLOW-UP", "CHEST PA AND CT THORAX", "LUNG NODULE SURVEILLANCE",
)
_XRAY_VIEWS = ("PA", "AP")
_CT_SERIES_DESCRIPTIONS = ("AXIAL 2.5MM", "CHEST W/O CONTRAST 2.5MM", "THORAX SOFT TISSUE")

_DATE0 = _dt.date(2015, 1, 1)
_TAG_PHI, _TAG_STUDY, _TAG_XRAY, _TAG_PNG, _TAG_CT, _TAG_ANATOMY = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSpec:
    """Size and seed of the demo dataset (defaults: ~300 2D images and 24 CT series)."""

    patients: int = 12
    studies_per_patient: int = 2
    xray_per_study: int = 6  # 2D DICOM X-rays per study
    png_per_study: int = 6  # 2D PNG images per study
    ct_series_per_study: int = 1  # 3D CT series per study (0 = none)
    image_size: int = 128  # 2D images are image_size x image_size
    ct_size: int = 64  # CT slices are ct_size x ct_size
    ct_slices: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable), e.g. for provenance attributes."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ``ValueError`` when a field is out of range."""
        if self.patients < 1:
            raise ValueError("patients must be >= 1")
        if self.studies_per_patient < 1:
            raise ValueError("studies_per_patient must be >= 1")
        for name in ("xray_per_study", "png_per_study", "ct_series_per_study"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")
        if self.ct_size < 16:
            raise ValueError("ct_size must be >= 16")
        if self.ct_slices < 4:
            raise ValueError("ct_slices must be >= 4")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`generate_demo_dataset` wrote.

    ``files``/``bytes`` count every file written (images, masks, manifests).
    ``manifest``/``multiclass_manifest`` are the paths of the two CSV files.
    ``phi`` maps a DICOM keyword (PatientName, PatientID, InstitutionName,
    AccessionNumber, ReferringPhysicianName) to the distinct fake values written,
    in order of first use; PatientName values are DICOM PN strings like ``DOE^JOHN``.
    Names and IDs are always listed (they are in every patient folder name); the
    study-level values only when DICOM files were written.
    """

    root: str
    files: int
    bytes: int
    patients: int
    manifest: str
    multiclass_manifest: str
    phi: dict[str, list[str]]


def generate_demo_dataset(out_dir: str | Path, spec: DemoSpec) -> DemoSummary:
    """Write the demo dataset described in the module docstring into ``out_dir``.

    The folder is created if needed; files of the same name are overwritten, other
    files are left alone (use a fresh folder for exact counts). Returns a summary
    with file/byte counts, manifest paths and the fake PHI values used.
    """
    spec.validate()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = _Output(root)
    patients = plan_patients(spec)
    rows: list[tuple[str, str, str, str]] = []
    rows_mc: list[tuple[str, str, str, str]] = []
    phi: dict[str, list[str]] = {
        k: []
        for k in ("PatientName", "PatientID", "InstitutionName", "AccessionNumber", "ReferringPhysicianName")
    }

    for pat in patients:
        _add_unique(phi["PatientName"], pat.name)
        _add_unique(phi["PatientID"], pat.pid)
        for st in pat.studies:
            if spec.xray_per_study or spec.ct_series_per_study:  # study-level PHI lives in DICOM headers
                _add_unique(phi["InstitutionName"], st.institution)
                _add_unique(phi["AccessionNumber"], st.accession)
                _add_unique(phi["ReferringPhysicianName"], st.physician)
            srng = np.random.default_rng([spec.seed, _TAG_STUDY, pat.index, st.index])
            xray_lesion = _balanced_labels(srng, spec.xray_per_study)
            png_lesion = _balanced_labels(srng, spec.png_per_study)
            xray_common = _encode_elements(_xray_common(pat, st, spec.image_size, spec.image_size))
            for i in range(spec.xray_per_study):
                rel, cls = _write_xray(out, spec, pat, st, i, bool(xray_lesion[i]), xray_common)
                rows.append((rel, "lesion" if cls != "none" else "none", "", ""))
                rows_mc.append((rel, cls, "", ""))
            for i in range(spec.png_per_study):
                rel, cls = _write_png(out, spec, pat, st, i, bool(png_lesion[i]))
                rows.append((rel, "lesion" if cls != "none" else "none", "", pat.pid))
                rows_mc.append((rel, cls, "", pat.pid))
            for j in range(spec.ct_series_per_study):
                rel, mask_rel, cls = _write_ct_series(out, spec, pat, st, j)
                rows.append((rel, "lesion" if cls != "none" else "none", mask_rel, ""))
                rows_mc.append((rel, cls, mask_rel, ""))

    manifest = _write_manifest(out, "labels.csv", rows)
    manifest_mc = _write_manifest(out, "labels_multiclass.csv", rows_mc)
    return DemoSummary(
        root=str(root),
        files=out.files,
        bytes=out.bytes,
        patients=len(patients),
        manifest=str(manifest),
        multiclass_manifest=str(manifest_mc),
        phi=phi,
    )


def write_defective_files(out_dir: str | Path) -> dict[str, str]:
    """Write one file of each bad-input kind (and a few odd but valid files) into ``out_dir``.

    Returns ``{relative_path: expected_quarantine_reason}`` where the reason is a
    ``QuarantineReason`` value from docs/design.md, or ``""`` for files a reader
    must accept:

    ==============================  =====================  ==============================
    file                            reason                 what it is
    ==============================  =====================  ==============================
    not_dicom.dcm                   not_dicom              a text file named ``.dcm``
    truncated.dcm                   truncated              first 60 % of a valid DX file
    no_pixel_data.dcm               no_pixel_data          DX header without PixelData
    text_report_sr.dcm              non_image_dicom        Basic Text SR, no pixels
    corrupt_mask.nii.gz             unreadable_nifti       gzip stream cut in the voxel data
    corrupt.png                     unreadable_image       PNG cut in its image data
    mixed/IM000{1..6}.dcm           ""                     one CT series, 48x48 and 40x40: split by
                                                           size into two volumes (dcm2niix-style)
    valid_dx.dcm                    ""                     valid DX
    valid_dx_copy.dcm               duplicate_instance     byte copy of valid_dx.dcm
    valid_dx_collision.dcm          ""                     valid_dx.dcm's SOPInstanceUID, other pixels:
                                                           a UID collision, ingested and reported
    us_rgb.dcm                      ""                     US, RGB, SamplesPerPixel 3
    multiframe_xa.dcm               ""                     XA, NumberOfFrames 8
    tiff16.tif                      ""                     16-bit grayscale TIFF
    ==============================  =====================  ==============================

    The header PHI is the same fake patient in all DICOM files. The duplicate's name
    sorts after the original's, so "first seen wins" keeps ``valid_dx.dcm``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([987654321, 0])
    pat = DemoPatient(
        index=0, name="ROE^RICHARD", pid="55501234", birth_date=_dt.date(1961, 3, 14), sex="M",
        dir="ROE_RICHARD_55501234", studies=(),
    )
    st = DemoStudy(
        index=0, dir="study01", uid=_uid(-1, "defective", "study"), date=_dt.date(2021, 6, 2),
        time="101530", accession="ACC9990001", institution=_INSTITUTIONS[0], physician=_PHYSICIANS[0],
        description=_STUDY_DESCRIPTIONS[0], study_id="990001",
    )
    reasons: dict[str, str] = {}

    def put(rel: str, data: bytes, reason: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        reasons[rel] = reason

    put(
        "not_dicom.dcm",
        b"Radiology report draft\nPatient: see RIS\nThis is a text file, not a DICOM object.\n" * 4,
        "not_dicom",
    )

    size = 96
    anatomy = _xray_anatomy(0, 2**31, size)  # a patient index no demo cohort uses

    def dx(tag: str) -> Dataset:
        img = _render_2d(anatomy, rng, size, (size / 2, size / 2, 10.0, 2.0))
        return _xray_dataset(pat, st, _uid(-1, "defective", tag), _uid(-1, "defective", tag, "series"),
                             1, "PA", _to_uint12(img))

    whole = _dicom_bytes(dx("truncated"))
    put("truncated.dcm", whole[: int(len(whole) * 0.6)], "truncated")

    ds = dx("nopix")
    del ds.PixelData
    put("no_pixel_data.dcm", _dicom_bytes(ds), "no_pixel_data")

    put("text_report_sr.dcm", _dicom_bytes(_text_sr_dataset(pat, st)), "non_image_dicom")

    valid = _dicom_bytes(dx("valid"))
    put("valid_dx.dcm", valid, "")
    put("valid_dx_copy.dcm", valid, "duplicate_instance")
    put("valid_dx_collision.dcm", _dicom_bytes(dx("valid")), "")  # same UIDs, freshly drawn noise

    # NIfTI whose gzip stream ends inside the voxel data (header still parses).
    noise = rng.integers(0, 255, size=(32, 32, 32), dtype=np.uint8)
    nifti = _nifti_gz(noise, np.eye(4))
    put("corrupt_mask.nii.gz", nifti[: len(nifti) // 2], "unreadable_nifti")

    png = _png_bytes(rng.integers(0, 256, size=(64, 64), dtype=np.uint8))
    put("corrupt.png", png[: len(png) // 2], "unreadable_image")

    # One CT series whose slices have two different sizes.
    series_uid = _uid(-1, "defective", "mixed")
    for k, n in enumerate((48, 48, 48, 48, 40, 40)):
        vol = np.full((n, n), CT_BODY_HU - CT_RESCALE_INTERCEPT, dtype=np.int16)
        ds = _ct_dataset(pat, st, series_uid, _uid(-1, "defective", "mixed", k), _uid(-1, "defective", "for"),
                         2, "AXIAL 2.5MM", 6 - k, (-n * 0.4, -n * 0.4, k * CT_SLICE_THICKNESS), vol)
        put(f"mixed/IM{k + 1:04d}.dcm", _dicom_bytes(ds), "")

    put("us_rgb.dcm", _dicom_bytes(_us_dataset(pat, st, rng)), "")
    put("multiframe_xa.dcm", _dicom_bytes(_xa_multiframe_dataset(pat, st, rng)), "")

    import tifffile

    tif = io.BytesIO()
    ramp = (np.arange(80, dtype=np.uint16)[:, None] * 700 + np.arange(64, dtype=np.uint16)[None, :] * 90)
    tifffile.imwrite(tif, ramp.astype(np.uint16), photometric="minisblack", metadata=None)
    put("tiff16.tif", tif.getvalue(), "")
    return dict(sorted(reasons.items()))


# --------------------------------------------------------------------------------------
# Planning: patients, studies, fake PHI
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoStudy:
    index: int
    dir: str
    uid: str
    date: _dt.date
    time: str
    accession: str
    institution: str
    physician: str
    description: str
    study_id: str


@dataclass(frozen=True)
class DemoPatient:
    index: int
    name: str
    pid: str
    birth_date: _dt.date
    sex: str
    dir: str
    studies: tuple[DemoStudy, ...]


def plan_patients(spec: DemoSpec) -> list[DemoPatient]:
    """Draw unique names/IDs/accessions for all patients and studies of ``spec``."""
    rng = np.random.default_rng([spec.seed, _TAG_PHI])
    n = spec.patients
    n_given = len(_GIVEN_MALE) + len(_GIVEN_FEMALE)
    space = len(_SURNAMES) * n_given
    if n > space * 27:
        raise ValueError(f"at most {space * 27} patients supported")
    # Index space: (middle initial 0..26) x surname x given; 0 = no middle initial.
    name_idx = rng.choice(space if n <= space else space * 27, size=n, replace=False)
    pids = rng.choice(90_000_000, size=n, replace=False) + 10_000_000
    n_st = n * spec.studies_per_patient
    accessions = rng.choice(9_000_000, size=n_st, replace=False) + 1_000_000
    patients = []
    for p in range(n):
        middle, rest = divmod(int(name_idx[p]), space)
        surname, given_i = divmod(rest, n_given)
        male = given_i < len(_GIVEN_MALE)
        given = _GIVEN_MALE[given_i] if male else _GIVEN_FEMALE[given_i - len(_GIVEN_MALE)]
        parts = [_SURNAMES[surname], given] + ([chr(64 + middle)] if middle else [])
        name = "^".join(parts)
        pid = f"{int(pids[p]):08d}"
        prng = np.random.default_rng([spec.seed, _TAG_PHI, p])
        birth = _DATE0 - _dt.timedelta(days=int(prng.integers(20 * 365, 85 * 365)))
        first_day = int(prng.integers(0, 7 * 365))
        studies = []
        for s in range(spec.studies_per_patient):
            day = first_day + s * int(prng.integers(30, 400))
            secs = int(prng.integers(7 * 3600, 19 * 3600))
            studies.append(
                DemoStudy(
                    index=s,
                    dir=f"study{s + 1:02d}",
                    uid=_uid(spec.seed, "study", p, s),
                    date=_DATE0 + _dt.timedelta(days=day),
                    time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
                    accession=f"ACC{int(accessions[p * spec.studies_per_patient + s]):07d}",
                    institution=_INSTITUTIONS[int(prng.integers(len(_INSTITUTIONS)))],
                    physician=_PHYSICIANS[int(prng.integers(len(_PHYSICIANS)))],
                    description=_STUDY_DESCRIPTIONS[int(prng.integers(len(_STUDY_DESCRIPTIONS)))],
                    study_id=f"{int(prng.integers(1, 999_999)):06d}",
                )
            )
        patients.append(
            DemoPatient(
                index=p, name=name, pid=pid, birth_date=birth, sex="M" if male else "F",
                dir="_".join(parts) + "_" + pid, studies=tuple(studies),
            )
        )
    return patients


def _uid(seed: int, *parts: object) -> str:
    """Deterministic ``2.25.<int>`` UID from a 128-bit hash of ``seed`` and ``parts``."""
    text = "|".join(["medpipe-demo", str(seed), *map(str, parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


_IMPLEMENTATION_UID = _uid(0, "implementation")


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` booleans, half True (random side gets the odd one), in random order."""
    return rng.permutation((np.arange(n) + int(rng.integers(2))) % 2).astype(bool)


def _add_unique(values: list[str], value: str) -> None:
    if value not in values:
        values.append(value)


# --------------------------------------------------------------------------------------
# 2D image model
# --------------------------------------------------------------------------------------


def _max_shift(size: int) -> int:
    return max(1, size // 32)


def _soft_inside(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, edge: float) -> np.ndarray:
    """Soft indicator (0..1) of the ellipse centred (cu, cv) with semi-axes (au, av), in normalised units."""
    d = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) / (edge / min(au, av) + 0.02)))


@functools.lru_cache(maxsize=64)
def _xray_anatomy(seed: int, p: int, size: int) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """One patient's chest: (background, lung weight, gain, offset, noise sd).

    ``background`` and ``lung`` are ``(size + 2m, size + 2m)`` float32 (read-only) with margin
    ``m = _max_shift(size)`` so that :func:`_render_2d` can crop a shifted window. Body and lung
    shapes, mediastinum, ribs and the intensity gain/offset/noise level are drawn per patient.
    """
    rng = np.random.default_rng([seed, _TAG_ANATOMY, p, size])
    m = _max_shift(size)
    grid = np.linspace(-1 - 2.0 * m / size, 1 + 2.0 * m / size, size + 2 * m)
    v, u = np.meshgrid(grid, grid, indexing="ij")
    edge = 2.0 / size * 1.5
    uni = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731 - small helper
    img = 0.06 + 0.46 * _soft_inside(u, v, uni(-0.04, 0.04), uni(0.05, 0.15), uni(0.72, 0.95), uni(0.95, 1.12), edge)
    lung_h, lung_y = uni(0.5, 0.7), uni(-0.14, -0.02)
    lungs = np.clip(
        _soft_inside(u, v, -uni(0.34, 0.46), lung_y + uni(-0.03, 0.03), uni(0.22, 0.34), lung_h * uni(0.95, 1.05), edge)
        + _soft_inside(u, v, uni(0.34, 0.46), lung_y + uni(-0.03, 0.03), uni(0.22, 0.34), lung_h * uni(0.95, 1.05), edge),
        0, 1)
    img -= uni(0.2, 0.32) * lungs
    freq, phase, bend = uni(11, 17), uni(0, 2 * np.pi), uni(1.0, 2.0)
    img += uni(0.03, 0.06) * lungs * (0.5 + 0.5 * np.sin(freq * v + phase - bend * u**2))  # ribs
    img += uni(0.12, 0.2) * np.exp(-((u - uni(-0.03, 0.03)) / uni(0.1, 0.17)) ** 2) * (v > -0.85)  # mediastinum
    img += uni(0.06, 0.12) * _soft_inside(u, v, uni(-0.05, 0.05), uni(0.85, 1.05), 0.9, 0.35, edge)  # diaphragm
    gain, offset = uni(*XRAY_GAIN), uni(*XRAY_OFFSET)
    noise = uni(*XRAY_NOISE)
    bg, lung = np.clip(img, 0.0, 1.0).astype(np.float32), lungs.astype(np.float32)
    bg.setflags(write=False)
    lung.setflags(write=False)
    return bg, lung, gain, offset, noise


def _plan_2d_lesion(rng: np.random.Generator, size: int, lung: np.ndarray) -> tuple[float, float, float, float]:
    """Draw a lesion (cy, cx, radius, contrast in noise sd) for a ``size`` px image.

    Radius 6-14 px at 128 px; centre in the central 70 % of the image, inside a lung when one
    of 20 draws lands there (``lung`` is the patient's lung weight, cropped to the image).
    """
    scale = size / 128.0
    radius = float(rng.uniform(*XRAY_LESION_RADIUS)) * scale
    cnr = float(rng.uniform(*XRAY_LESION_CNR))
    cands = rng.uniform(0.15 * size, 0.85 * size, size=(20, 2))
    in_lung = lung[cands[:, 0].astype(int), cands[:, 1].astype(int)] > 0.5
    cy, cx = cands[int(np.argmax(in_lung))]
    return float(cy), float(cx), radius, cnr


def _add_blob(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float, amp: float,
              edge: float) -> None:
    """Add an ellipse (semi-axes ry, rx px, rotated by ``angle``) of peak ``amp`` with a soft edge, in place."""
    size = img.shape[0]
    reach = max(ry, rx) + 4 * edge + 2
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    c, s = np.cos(angle), np.sin(angle)
    a, b = (yy - cy) * c + (xx - cx) * s, -(yy - cy) * s + (xx - cx) * c
    d = np.sqrt((a / ry) ** 2 + (b / rx) ** 2, dtype=np.float32) * min(ry, rx)  # ~px from the centre
    img[y0:y1, x0:x1] += np.float32(amp) / (1.0 + np.exp((d - min(ry, rx)) / np.float32(edge)))


def _render_2d(
    anatomy: tuple[np.ndarray, np.ndarray, float, float, float], rng: np.random.Generator, size: int,
    lesion: tuple[float, float, float, float] | None,
) -> np.ndarray:
    """One 2D image in [0, 1] (float32): shifted patient anatomy, clutter, hard negatives, lesion, noise."""
    bg, lung, gain, offset, noise = anatomy
    m = _max_shift(size)
    dy, dx = (int(x) for x in rng.integers(0, 2 * m + 1, size=2))
    from scipy.ndimage import gaussian_filter

    clutter = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), size / 40.0, mode="reflect")
    clutter *= np.float32(XRAY_CLUTTER * noise / max(float(clutter.std()), 1e-6))
    img = bg[dy : dy + size, dx : dx + size] * np.float32(gain * rng.uniform(0.97, 1.03))
    img += np.float32(offset + rng.uniform(-0.01, 0.01)) + clutter
    scale = size / 128.0
    for _ in range(int(rng.integers(*XRAY_VESSELS))):  # vessels seen end-on: small, bright, round
        cy, cx = rng.uniform(0.1 * size, 0.9 * size, size=2)
        r = float(rng.uniform(1.5, 3.5)) * scale
        _add_blob(img, cy, cx, r, r, 0.0, float(rng.uniform(*XRAY_VESSEL_CNR)) * noise, 0.6 * scale + 0.3)
    if rng.random() < XRAY_MIMIC_P:  # rib crossing / oblique vessel: lesion-sized but elongated
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, size=2)
        r = float(rng.uniform(2.5, 5.0)) * scale
        _add_blob(img, cy, cx, r, r * float(rng.uniform(2.2, 3.2)), float(rng.uniform(0, np.pi)),
                  float(rng.uniform(*XRAY_MIMIC_CNR)) * noise, 1.0 * scale + 0.3)
    if lesion is not None:
        cy, cx, r, cnr = lesion
        _add_blob(img, cy, cx, r, r, 0.0, cnr * noise, max(1.0, 0.2 * r))
    img += rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise)
    return np.clip(img, 0.0, 1.0, out=img)


def _to_uint12(img: np.ndarray) -> np.ndarray:
    return np.rint(img * 4095.0).astype(np.uint16)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(img * 255.0).astype(np.uint8)


def _image_2d(
    spec: DemoSpec, tag: int, p: int, s: int, i: int, has_lesion: bool
) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Rendered image in [0, 1] and its lesion (cy, cx, radius, contrast) or None for one 2D file."""
    anatomy = _xray_anatomy(spec.seed, p, spec.image_size)
    rng = np.random.default_rng([spec.seed, tag, p, s, i])
    m = _max_shift(spec.image_size)
    lesion: tuple[float, float, float, float] | None = _plan_2d_lesion(
        rng, spec.image_size, anatomy[1][m:-m, m:-m])  # always drawn: stable stream
    lesion = lesion if has_lesion else None
    return _render_2d(anatomy, rng, spec.image_size, lesion), lesion


def _class_2d(lesion: tuple[float, float, float, float] | None, size: int) -> str:
    if lesion is None:
        return "none"
    return "small" if lesion[2] < XRAY_SMALL_BELOW * size / 128.0 else "large"


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


class _Output:
    """Writes files under ``root`` and counts them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = 0
        self.bytes = 0
        self._dirs: set[Path] = set()

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        path.write_bytes(data)
        self.files += 1
        self.bytes += len(data)


def _write_xray(
    out: _Output, spec: DemoSpec, pat: DemoPatient, st: DemoStudy, i: int, has_lesion: bool, common: dict[int, bytes],
) -> tuple[str, str]:
    """Render and write one X-ray; ``common`` is the encoded study-level header."""
    img, lesion = _image_2d(spec, _TAG_XRAY, pat.index, st.index, i, has_lesion)
    sop_uid = _uid(spec.seed, "xray", pat.index, st.index, i)
    ts = _xray_transfer_syntax(spec, pat.index, st.index, i)
    own = _xray_own(st, sop_uid, _uid(spec.seed, "xray-series", pat.index, st.index, i), i + 1,
                    _xray_view(spec, pat.index, st.index, i), _to_uint12(img), ts)
    rel = f"xray/{pat.dir}/{st.dir}/img{i + 1:03d}.dcm"
    out.write(rel, _part10_bytes(DX_PRESENTATION_SOP, sop_uid, ts, common, own))
    return rel, _class_2d(lesion, spec.image_size)


def _xray_index(spec: DemoSpec, p: int, s: int, i: int) -> int:
    """Global X-ray index (drives the transfer syntax and view patterns)."""
    return (p * spec.studies_per_patient + s) * spec.xray_per_study + i


def _xray_transfer_syntax(spec: DemoSpec, p: int, s: int, i: int) -> str:
    """``k % 6 == 1``: RLE Lossless, ``k % 6 == 2``: JPEG 2000 Lossless, else Explicit VR LE."""
    k = _xray_index(spec, p, s, i) % 6
    return {1: RLELossless, 2: JPEG2000Lossless}.get(k, ExplicitVRLittleEndian)


def _xray_view(spec: DemoSpec, p: int, s: int, i: int) -> str:
    return _XRAY_VIEWS[_xray_index(spec, p, s, i) % 2]


def _write_png(
    out: _Output, spec: DemoSpec, pat: DemoPatient, st: DemoStudy, i: int, has_lesion: bool
) -> tuple[str, str]:
    img, lesion = _image_2d(spec, _TAG_PNG, pat.index, st.index, i, has_lesion)
    rel = f"png/{pat.dir}/{st.dir}/img{i + 1:03d}.png"
    out.write(rel, _png_bytes(_to_uint8(img)))
    return rel, _class_2d(lesion, spec.image_size)


def _ct_volume(
    spec: DemoSpec, p: int, s: int, j: int, has_lesion: bool
) -> tuple[np.ndarray, np.ndarray, float | None, np.random.Generator]:
    """HU volume (Z, Y, X) float32, mask uint8, in-plane lesion radius (or None) and the rng.

    Patient-level (same in every series of a patient): body size, fat layer, lung size, HU offset and
    noise sd. Series-level: position jitter, vessels along z (hard negatives) and the lesion, a
    physically round ellipsoid in soft tissue rendered with partial volume (4x supersampled along
    z, 2x in-plane) and a slight in-plane blur; the mask is the voxels at least half inside it.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    prng = np.random.default_rng([spec.seed, _TAG_ANATOMY, p, 0])  # 2D anatomy uses size >= 32 here
    rng = np.random.default_rng([spec.seed, _TAG_CT, p, s, j])
    n, nz = spec.ct_size, spec.ct_slices
    scale = n / 64.0
    a0, b0 = n * float(prng.uniform(0.36, 0.46)), n * float(prng.uniform(0.26, 0.34))  # body semi-axes x, y
    fat = float(prng.uniform(1.0, 3.0)) * scale
    lung_ax, lung_ay = float(prng.uniform(0.28, 0.38)), float(prng.uniform(0.5, 0.7))  # fractions of the body
    offset = float(prng.uniform(*CT_HU_OFFSET))
    noise = float(prng.uniform(*CT_NOISE_HU))
    a, b = a0 * float(rng.uniform(0.97, 1.03)), b0 * float(rng.uniform(0.97, 1.03))
    c0y, c0x = n / 2 + float(rng.uniform(-1, 1)), n / 2 + float(rng.uniform(-1, 1))

    zz, yy, xx = np.ogrid[:nz, :n, :n]
    ell = ((xx - c0x) / a) ** 2 + ((yy - c0y) / b) ** 2  # (1, n, n)
    body = ell <= 1.0
    soft = ((xx - c0x) / max(a - fat, 1.0)) ** 2 + ((yy - c0y) / max(b - fat, 1.0)) ** 2 <= 1.0
    dome = 0.75 + 0.25 * (zz + 0.5) / nz  # lungs widen towards the bottom slices
    lung = np.zeros((nz, n, n), dtype=bool)
    for side in (-1, 1):
        lx = c0x + side * 0.45 * a
        lung |= ((xx - lx) / (lung_ax * a * dome)) ** 2 + ((yy - c0y + 0.05 * b) / (lung_ay * b * dome)) ** 2 <= 1.0
    lung &= soft
    hu = np.full((nz, n, n), CT_AIR_HU, dtype=np.float32)
    hu[np.broadcast_to(body, hu.shape)] = CT_FAT_HU + offset
    hu[np.broadcast_to(soft, hu.shape)] = CT_BODY_HU + offset
    hu[lung] = CT_LUNG_HU + offset
    tissue = np.broadcast_to(soft, hu.shape) & ~lung

    for _ in range(int(rng.integers(*CT_VESSELS))):  # vessels running along z: seen end-on in every slice
        for _try in range(20):
            vy, vx = c0y + float(rng.uniform(-0.8, 0.8)) * b, c0x + float(rng.uniform(-0.8, 0.8)) * a
            if tissue[nz // 2, int(vy), int(vx)]:
                break
        rv = float(rng.uniform(1.0, 2.2)) * scale
        drift_y, drift_x = rng.uniform(-0.15, 0.15, size=2) * scale
        d = np.sqrt((yy - vy - drift_y * (zz - nz / 2)) ** 2 + (xx - vx - drift_x * (zz - nz / 2)) ** 2)
        vessel = np.clip(rv + 0.5 - d, 0.0, 1.0)  # partial volume over the last voxel
        hu += (float(rng.uniform(1.5, 3.0)) * noise * vessel * tissue).astype(np.float32)

    r = max(1.5, float(rng.uniform(*CT_LESION_RADIUS)) * scale)  # in-plane radius, voxels
    rz = min(max(1.0, r * CT_PIXEL_SPACING / CT_SLICE_THICKNESS), (nz - 1) / 2 - 0.5)  # round in mm; fits the slab
    cnr = float(rng.uniform(*CT_LESION_CNR))
    cands = np.column_stack([rng.uniform(rz, nz - 1 - rz, 30), c0y + rng.uniform(-0.7, 0.7, 30) * b,
                             c0x + rng.uniform(-0.7, 0.7, 30) * a])
    # distance (in-plane voxel units) to lung, fat or air: the first candidate with room for the lesion, else the roomiest
    room = distance_transform_edt(tissue, sampling=(CT_SLICE_THICKNESS / CT_PIXEL_SPACING, 1.0, 1.0))
    fits = np.array([float(room[int(z), int(y), int(x)]) for z, y, x in cands])
    pick = int(np.argmax(fits > r + 1.0)) if (fits > r + 1.0).any() else int(np.argmax(fits))
    cz, cy, cx = (float(v) for v in cands[pick])

    mask = np.zeros((nz, n, n), dtype=np.uint8)
    if has_lesion:
        occ: np.ndarray = np.zeros((nz, n, n), dtype=np.float32)
        subs = [(dz, dy, dx) for dz in (-0.375, -0.125, 0.125, 0.375) for dy in (-0.25, 0.25) for dx in (-0.25, 0.25)]
        for dz, dy, dx in subs:
            occ += (((zz + dz - cz) / rz) ** 2 + ((yy + dy - cy) / r) ** 2 + ((xx + dx - cx) / r) ** 2 <= 1.0)
        occ = occ / len(subs) * tissue  # the lesion displaces soft tissue only (it may abut a lung)
        mask[occ >= 0.5] = 1
        blurred = gaussian_filter(occ, sigma=(0.0, 0.7 * scale, 0.7 * scale))
        hu += (cnr * noise * blurred).astype(np.float32)
    hu += rng.standard_normal((nz, n, n), dtype=np.float32) * np.float32(noise)
    return hu, mask, (r if has_lesion else None), rng


def _ct_geometry(spec: DemoSpec) -> tuple[float, float, float]:
    """Patient-space (LPS) position of voxel (0, 0, 0): centred in x/y, z starts at -half length."""
    half = spec.ct_size * CT_PIXEL_SPACING / 2
    return -half, -half, -(spec.ct_slices * CT_SLICE_THICKNESS) / 2


def _ct_affine(x0: float, y0: float, z0: float, dx: float, dy: float, dz: float) -> np.ndarray:
    """RAS affine of NIfTI data ``mask_zyx.transpose(2, 1, 0)`` for a DICOM (LPS) axial series."""
    return np.array(
        [[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]], dtype=np.float64
    )


def _write_ct_series(out: _Output, spec: DemoSpec, pat: DemoPatient, st: DemoStudy, j: int) -> tuple[str, str, str]:
    """Write one CT series (shuffled slice file names) and its mask; returns (dir, mask, class)."""
    k_global = (pat.index * spec.studies_per_patient + st.index) * spec.ct_series_per_study + j
    has_lesion = k_global % 5 != 1
    hu, mask, radius, rng = _ct_volume(spec, pat.index, st.index, j, has_lesion)
    stored = np.rint(hu - CT_RESCALE_INTERCEPT).astype(np.int16)
    nz = spec.ct_slices
    perm = rng.permutation(nz)
    if np.all(perm == np.arange(nz)):
        perm = perm[::-1].copy()
    rel_dir = f"ct/{pat.dir}/{st.dir}/series{j + 1:02d}"
    series_number = 100 + j + 1
    description = _CT_SERIES_DESCRIPTIONS[int(rng.integers(len(_CT_SERIES_DESCRIPTIONS)))]
    common = _encode_elements(
        _ct_common(pat, st, _uid(spec.seed, "ct-series", pat.index, st.index, j),
                   _uid(spec.seed, "ct-for", pat.index, st.index, j), series_number, description,
                   spec.ct_size, spec.ct_size)
    )
    x0, y0, z0 = _ct_geometry(spec)
    for z in (int(v) for v in perm):  # files created in shuffled order too
        sop_uid = _uid(spec.seed, "ct", pat.index, st.index, j, z)
        own = _ct_own(st, series_number, sop_uid, nz - z, (x0, y0, z0 + z * CT_SLICE_THICKNESS), stored[z])
        out.write(f"{rel_dir}/IM{int(perm[z]) + 1:04d}.dcm",
                  _part10_bytes(CT_IMAGE_SOP, sop_uid, ExplicitVRLittleEndian, common, own))
    mask_rel = f"masks/{pat.dir}_{st.dir}_series{j + 1:02d}.nii.gz"
    affine = _ct_affine(x0, y0, z0, CT_PIXEL_SPACING, CT_PIXEL_SPACING, CT_SLICE_THICKNESS)
    out.write(mask_rel, _nifti_gz(mask.transpose(2, 1, 0), affine))
    if radius is None:
        cls = "none"
    else:
        cls = "small" if radius < CT_SMALL_BELOW * spec.ct_size / 64.0 else "large"
    return rel_dir, mask_rel, cls


def _write_manifest(out: _Output, name: str, rows: list[tuple[str, str, str, str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "mask", "patient_id"])
    writer.writerows(rows)
    out.write(name, buf.getvalue().encode("utf-8"))
    return out.root / name


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------

_CHARSET = "ISO_IR 100"
_IMPLEMENTATION_VERSION = "MEDPIPE_DEMO_1"


def _dicom_bytes(ds: Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part-10 file with pydicom (reference path)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _encode_elements(ds: Dataset) -> dict[int, bytes]:
    """Each top-level element of ``ds`` encoded as Explicit VR Little Endian bytes, by tag."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, _CHARSET)
        out[int(elem.tag)] = fp.getvalue()
    return out


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group, as ``dcmwrite(enforce_file_format=True)`` writes them."""

    def ui(v: str) -> bytes:
        b = v.encode("ascii")
        return b + b"\0" if len(b) % 2 else b

    version = _IMPLEMENTATION_VERSION.encode("ascii")
    version += b" " * (len(version) % 2)
    body = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", ui(sop_class)),
        _meta_element(0x00020003, b"UI", ui(sop_uid)),
        _meta_element(0x00020010, b"UI", ui(transfer_syntax)),
        _meta_element(0x00020012, b"UI", ui(_IMPLEMENTATION_UID)),
        _meta_element(0x00020013, b"SH", version),
    ])
    return b"\0" * 128 + b"DICM" + _meta_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(_IMPLEMENTATION_UID)
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _part10_bytes(
    sop_class: str, sop_uid: str, transfer_syntax: str, common: dict[int, bytes], own: Dataset
) -> bytes:
    """Fast Part-10 writer: pre-encoded shared elements merged with the per-file ones.

    Produces the same bytes as ``_dicom_bytes(_merge(...))`` (checked by the tests)
    at a fraction of the cost, because most of a header is shared by a study/series.
    All transfer syntaxes used here are explicit VR little endian.
    """
    elems = dict(common)
    elems.update(_encode_elements(own))
    body = b"".join(elems[t] for t in sorted(elems))
    return _file_meta_bytes(sop_class, sop_uid, transfer_syntax) + body


def _merge(common: Dataset, own: Dataset, sop_class: str, sop_uid: str, transfer_syntax: str) -> Dataset:
    """Full dataset (with file meta) from a shared part and a per-file part."""
    ds = Dataset()
    for elem in common:
        ds.add(elem)
    for elem in own:
        ds.add(elem)
    ds.file_meta = _file_meta(sop_class, sop_uid, transfer_syntax)
    return ds


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _nifti_gz(data_xyz: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped single-file NIfTI-1 bytes (gzip mtime fixed at 0 for determinism)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(data_xyz), affine)
    img.header.set_data_dtype(data_xyz.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------------------
# DICOM datasets
# --------------------------------------------------------------------------------------


def _common_base(sop_class: str, modality: str) -> Dataset:
    """Elements every demo DICOM file has (minus per-instance ones)."""
    ds = Dataset()
    ds.SpecificCharacterSet = _CHARSET
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.Manufacturer = "MEDPIPE DEMO IMAGING"
    ds.ManufacturerModelName = "SYNTH-1"
    ds.StationName = "DEMO-STATION-01"
    return ds


def _new_dataset(sop_class: str, sop_uid: str, modality: str) -> Dataset:
    """A complete single dataset with file meta (used for the one-off files)."""
    ds = _common_base(sop_class, modality)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
    return ds


def _add_patient_study(ds: Dataset, pat: DemoPatient, st: DemoStudy) -> None:
    """Patient and study PHI shared by every file of a study."""
    ds.PatientName = pat.name
    ds.PatientID = pat.pid
    ds.PatientBirthDate = pat.birth_date.strftime("%Y%m%d")
    ds.PatientSex = pat.sex
    age = (st.date - pat.birth_date).days // 365
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyInstanceUID = st.uid
    ds.StudyDate = st.date.strftime("%Y%m%d")
    ds.StudyTime = st.time
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.AcquisitionDate = ds.StudyDate
    ds.AccessionNumber = st.accession
    ds.InstitutionName = st.institution
    ds.InstitutionAddress = "1 Hospital Way, Springfield"
    ds.ReferringPhysicianName = st.physician
    ds.StudyDescription = st.description
    ds.StudyID = st.study_id


def _times(st: DemoStudy, series_number: int, instance_number: int) -> tuple[str, str]:
    """(SeriesTime, ContentTime) a few minutes/seconds after the study time."""
    h, m, s = int(st.time[:2]), int(st.time[2:4]), int(st.time[4:])
    t0 = h * 3600 + m * 60 + s + 60 * (series_number % 100)
    t1 = t0 + instance_number

    def fmt(t: int) -> str:
        t %= 86400
        return f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}"

    return fmt(t0), fmt(t1)


def _add_pixel_module(ds: Dataset, rows: int, cols: int, dtype: npt.DTypeLike, bits_stored: int) -> None:
    """Image Pixel module attributes except PixelData / photometric / samples."""
    dtype = np.dtype(dtype)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if dtype.kind == "i" else 0


def _add_pixels(ds: Dataset, pixels: np.ndarray, rows: int, cols: int, bits_stored: int) -> None:
    """Pixel module plus native (uncompressed) PixelData for one-off datasets."""
    _add_pixel_module(ds, rows, cols, pixels.dtype, bits_stored)
    ds.add(_pixel_data_element(pixels, ExplicitVRLittleEndian, bits_stored, ""))


def _pixel_data_element(pixels: np.ndarray, transfer_syntax: str, bits_stored: int, photometric: str) -> DataElement:
    """(7FE0,0010) for native or (lossless, single-frame, grayscale) encapsulated syntaxes."""
    if transfer_syntax == ExplicitVRLittleEndian:
        vr = "OW" if pixels.dtype.itemsize > 1 else "OB"
        return DataElement(0x7FE00010, vr, np.ascontiguousarray(pixels).tobytes())
    frame = get_encoder(transfer_syntax).encode(
        np.ascontiguousarray(pixels),
        rows=pixels.shape[0], columns=pixels.shape[1], samples_per_pixel=1,
        bits_allocated=pixels.dtype.itemsize * 8, bits_stored=bits_stored,
        pixel_representation=1 if pixels.dtype.kind == "i" else 0,
        photometric_interpretation=photometric, number_of_frames=1,
    )
    elem = DataElement(0x7FE00010, "OB", encapsulate([frame]))
    elem.is_undefined_length = True
    return elem


def _xray_common(pat: DemoPatient, st: DemoStudy, rows: int, cols: int) -> Dataset:
    """DX header elements shared by all X-rays of a study (For Presentation, 12-bit MONOCHROME2)."""
    ds = _common_base(DX_PRESENTATION_SOP, "DX")
    _add_patient_study(ds, pat, st)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [XRAY_PIXEL_SPACING, XRAY_PIXEL_SPACING]
    ds.ImagerPixelSpacing = [XRAY_PIXEL_SPACING, XRAY_PIXEL_SPACING]
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    _add_pixel_module(ds, rows, cols, np.uint16, 12)
    return ds


def _xray_own(
    st: DemoStudy, sop_uid: str, series_uid: str, series_number: int, view: str, pixels: np.ndarray,
    transfer_syntax: str,
) -> Dataset:
    """Per-image DX elements (each X-ray is its own series, as is common for CR/DX)."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.SeriesTime, ds.ContentTime = _times(st, series_number, 1)
    ds.AcquisitionTime = ds.ContentTime
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"CHEST {view}"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]
    ds.add(_pixel_data_element(pixels, transfer_syntax, 12, "MONOCHROME2"))
    return ds


def _xray_dataset(
    pat: DemoPatient, st: DemoStudy, sop_uid: str, series_uid: str, series_number: int, view: str,
    pixels: np.ndarray, transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """Complete DX dataset (with file meta) for ``pydicom.dcmwrite``."""
    common = _xray_common(pat, st, *pixels.shape)
    own = _xray_own(st, sop_uid, series_uid, series_number, view, pixels, transfer_syntax)
    return _merge(common, own, DX_PRESENTATION_SOP, sop_uid, transfer_syntax)


def _ct_common(
    pat: DemoPatient, st: DemoStudy, series_uid: str, for_uid: str, series_number: int, description: str,
    rows: int, cols: int,
) -> Dataset:
    """CT header elements shared by all slices of a series (int16, HU = stored - 1024)."""
    ds = _common_base(CT_IMAGE_SOP, "CT")
    _add_patient_study(ds, pat, st)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.SliceThickness = CT_SLICE_THICKNESS
    ds.SpacingBetweenSlices = CT_SLICE_THICKNESS
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [CT_PIXEL_SPACING, CT_PIXEL_SPACING]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    _add_pixel_module(ds, rows, cols, np.int16, 16)
    return ds


def _ct_own(
    st: DemoStudy, series_number: int, sop_uid: str, instance_number: int,
    position: tuple[float, float, float], pixels: np.ndarray,
) -> Dataset:
    """Per-slice CT elements: instance UID/number, position, times, pixels."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.SeriesTime, ds.ContentTime = _times(st, series_number, instance_number)
    ds.AcquisitionTime = ds.SeriesTime
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.SliceLocation = round(float(position[2]), 4)
    ds.add(_pixel_data_element(pixels.astype(np.int16, copy=False), ExplicitVRLittleEndian, 16, "MONOCHROME2"))
    return ds


def _ct_dataset(
    pat: DemoPatient, st: DemoStudy, series_uid: str, sop_uid: str, for_uid: str, series_number: int,
    description: str, instance_number: int, position: tuple[float, float, float], pixels: np.ndarray,
) -> Dataset:
    """Complete CT slice dataset (with file meta) for ``pydicom.dcmwrite``."""
    common = _ct_common(pat, st, series_uid, for_uid, series_number, description, *pixels.shape)
    own = _ct_own(st, series_number, sop_uid, instance_number, position, pixels)
    return _merge(common, own, CT_IMAGE_SOP, sop_uid, ExplicitVRLittleEndian)


def _text_sr_dataset(pat: DemoPatient, st: DemoStudy) -> Dataset:
    """Basic Text SR with a one-item content tree (no pixel data)."""
    ds = _new_dataset(BASIC_TEXT_SR_SOP, _uid(-1, "defective", "sr"), "SR")
    _add_patient_study(ds, pat, st)
    ds.SeriesTime, ds.ContentTime = _times(st, 900, 1)
    ds.SeriesInstanceUID = _uid(-1, "defective", "sr-series")
    ds.SeriesNumber = 900
    ds.SeriesDescription = "RADIOLOGY REPORT"
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = f"Findings for {pat.name.replace('^', ' ')}: small nodule right upper lobe."
    ds.ContentSequence = Sequence([item])
    return ds


def _extra_image_dataset(pat: DemoPatient, st: DemoStudy, sop_class: str, key: str, series_number: int,
                         description: str, image_type: str) -> Dataset:
    """Header of a one-image series of the mixed-folder extras (US, XA), with the patient's fake PHI."""
    ds = _new_dataset(sop_class, _uid(-1, "defective", key), key.upper())
    _add_patient_study(ds, pat, st)
    ds.SeriesTime, ds.ContentTime = _times(st, series_number, 1)
    ds.SeriesInstanceUID = _uid(-1, "defective", f"{key}-series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type]
    return ds


def _us_dataset(pat: DemoPatient, st: DemoStudy, rng: np.random.Generator) -> Dataset:
    """Single-frame RGB ultrasound image (uint8, SamplesPerPixel 3, interleaved)."""
    ds = _extra_image_dataset(pat, st, US_IMAGE_SOP, "us", 5, "ABDOMEN US", "ABDOMINAL")
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    fan = ((xx - w / 2) ** 2 + yy**2 < (0.9 * h) ** 2) & (np.abs(xx - w / 2) < yy * 0.9 + 4)
    gray = (fan * (60 + 120 * rng.random((h, w)))).astype(np.uint8)
    rgb = np.stack([gray, gray, gray], axis=-1)
    rgb[4:12, 4:40] = (255, 200, 0)  # burned-in colour overlay bar
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BurnedInAnnotation = "NO"
    _add_pixels(ds, rgb, h, w, bits_stored=8)
    return ds


def _xa_multiframe_dataset(pat: DemoPatient, st: DemoStudy, rng: np.random.Generator) -> Dataset:
    """8-frame XA cine run, uint16 12-bit MONOCHROME2."""
    ds = _extra_image_dataset(pat, st, XA_IMAGE_SOP, "xa", 6, "CORONARY CINE", "SINGLE PLANE")
    ds.NumberOfFrames = 8
    ds.FrameTime = 66.7
    ds.CineRate = 15
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.3, 0.3]
    frames = (1500 + 200 * rng.standard_normal((8, 64, 64))).clip(0, 4095).astype(np.uint16)
    for f in range(8):
        frames[f, 30:34, 8 + 6 * f : 20 + 6 * f] = 300  # a moving dark "vessel"
    _add_pixels(ds, frames, 64, 64, bits_stored=12)
    return ds
