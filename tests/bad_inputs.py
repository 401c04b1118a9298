"""A bad-input corpus: one small SOURCE folder holding every kind of defective, odd or hostile input a hospital
export can contain, each with the outcome medpipe must give it, and fake PHI planted everywhere it can hide.

``write_bad_inputs(root)`` writes real files (pydicom, nibabel, tifffile, Pillow) into ``root`` (the SOURCE) and
a sibling folder ``<root>.outside`` (the target of links that leave SOURCE), and returns a :class:`BadCorpus`:
what discovery must list, the quarantine reason of each defective file, which units must be excluded from the
training arrays of a 2D / 3D dataset, which manifest lines must be reported, and every planted PHI string.

The rules the expectations follow (docs/store.md, README):

* every listed file is ingested or quarantined with one reason; hidden files/folders and the manifest are not
  listed;
* links: a link that stays inside SOURCE is followed, and each real file is listed once, under its first path in
  sorted order (a link that sorts after its already-listed target adds nothing; one that sorts before it lists
  the files under the link's path); a link that leaves SOURCE, or leads nowhere, is not followed, not listed, and
  is reported in ``reports/links.json``;
* a manifest label that looks like an identifier, a duplicate row and a row that climbs out of SOURCE
  (``../``) are manifest issues; the file they name is ingested unlabelled (a traversal row never labels a
  file of the same name inside SOURCE);
* a header that promises more pixels than any file could hold (RLE, 65535 x 65535, 600 bytes) is
  ``too_large`` before anything is allocated; an image without one finite pixel is ``non_finite_pixels``; an
  image with some non-finite pixels is ingested with a note;
* the localizer / echo / series-splitting cases are covered by tests/test_series_assembly.py.

Everything is deterministic (fixed seeds, fixed UIDs, gzip mtime 0); the corpus is ~0.2 MB and takes well
under a second to write.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medpipe.demo import write_defective_files

__all__ = ["BadCorpus", "Case", "PHI", "write_bad_inputs"]

DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
SC_SOP = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
BASIC_TEXT_SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"


class PHI:
    """The planted values. Every one is distinctive (no hash, UID or number can contain it by chance)."""

    NAME = "ZZPLANTED^ALICE"
    NAME_PATH = "ZZPLANTED_ALICE"  # the same name as export tools write it into folder names
    PATIENT_ID = "PLANTED-ID-884211"
    OTHER_NAMES = "ZZOTHERNAME^CAROL"
    PHYSICIAN = "Dr. Planted Bob"
    INSTITUTION = "ZZPlanted General Hospital"
    ADDRESS = "ZZPLANTED STREET 12, Springfield"
    ACCESSION = "ZZACC884211"
    STUDY_ID = "ZZSTUDY884"
    STUDY_DESCRIPTION = "ZZPLANTED STUDY OF ALICE"
    SERIES_DESCRIPTION = "ZZPLANTED SERIES OF ALICE"
    IMAGE_COMMENTS = "ZZCOMMENT Alice phoned from home"
    BODY_PART = "ZZPLANTEDBODY"  # CS, at most 16 characters
    RESCALE_TYPE = "ZZPLANTEDRT"
    OPERATOR = "ZZOPERATOR^DAVE"
    PRIVATE_CREATOR = "ZZPLANTED CREATOR"
    PRIVATE_VALUE = "ZZPRIVATE-ALICE-VALUE"
    PRIVATE_UN_VALUE = "ZZPRIVATEUN-ALICE"
    SR_TEXT = "ZZSRTEXT Alice Planted has a nodule"
    # Japanese (ISO 2022 IR 87): alphabetic = ideographic = phonetic
    JP_NAME = "ZZYAMADA^TAROU=山田^太郎=やまだ^たろう"
    JP_ALPHABETIC = "ZZYAMADA^TAROU"
    JP_IDEOGRAPHIC = "山田^太郎"
    JP_PHONETIC = "やまだ^たろう"
    JP_PATIENT_ID = "PLANTED-JP-5501"
    UTF8_NAME = "ZZPLANTÉ^ÅSA"
    # names in the file system and the manifest
    FILE_NAME = "ZZFILENAME_ALICE"
    UTF8_FILE = "ZZPLANTÉ_ÅSA"
    BAD_BYTES = "ZZBADBYTES"  # a file name that is not valid UTF-8: b"ZZBADBYTES_\xff\xfeQUINCY.dcm"
    BAD_BYTES_TAIL = "QUINCY"
    BAD_DIR = "ZZBADDIR"  # a folder name that is not valid UTF-8: b"ZZBADDIR_\xe9MARTHA"
    BAD_DIR_TAIL = "MARTHA"
    NEWLINE = "ZZNEWLINE"  # a file name holding a newline
    LINK_NAME = "ZZLINKNAME_ALICE"
    OUTSIDE = "ZZOUTSIDE_SECRET"
    MASK_NAME = "ZZMASKNAME_ALICE"
    MANIFEST_NAME = "ZZMANIFEST_ALICE"
    MANIFEST_PATIENT = "ZZMANIFEST-PID-3141"
    ID_LABEL = "884211"  # a manifest label that is a bare number: scanned as a whole token (see phi_tokens)


@dataclass(frozen=True)
class Case:
    """One written file (or link) and what medpipe must do with it."""

    path: str  # relative to SOURCE, as medpipe lists it (surrogate escapes for bytes that are not UTF-8)
    what: str
    reason: str = ""  # quarantine reason; "" = ingested
    listed: bool = True  # False: hidden, or a link that leaves SOURCE / leads nowhere
    unit_dims: int | None = None  # 2 or 3 when the file is its own archive unit (id = keyed hash of `path`)
    label: str | None = None  # the label the archive unit must carry (None = unlabelled)
    notes: bool = False  # the unit must carry a technical note (e.g. some non-finite pixels)


@dataclass
class BadCorpus:
    """What the corpus holds and what an ingest of it must report."""

    root: Path
    outside: Path
    manifest: str  # relative name of the manifest (give it as IngestConfig.manifest)
    cases: list[Case]
    expected_reasons: dict[str, int]  # quarantine reason -> files
    discovered: int  # files medpipe must list (hidden files, the manifest, links leaving SOURCE not counted)
    ingested_min: int  # = discovered - quarantined
    excluded_min: dict[str, int]  # "2d" / "3d" dataset -> units at least excluded from the training arrays
    phi: list[str]  # every planted string (>= 5 characters)
    phi_tokens: list[str]  # short planted values that must not appear as a whole token (digits, ...)
    manifest_issue_lines: dict[str, int]  # what -> CSV line that must be reported in reports/manifest_issues.json
    external_links: list[str]  # links not followed, to be reported in reports/links.json
    collision_pairs: int  # SOPInstanceUIDs shared by files with different pixels
    total_bytes: int

    def units(self, dims: int) -> list[Case]:
        """Cases that are their own archive unit of `dims` dimensions."""
        return [c for c in self.cases if c.unit_dims == dims and not c.reason and c.listed]

    def case(self, path: str) -> Case:
        return next(c for c in self.cases if c.path == path)


# --------------------------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    text = "|".join(["medpipe-bad-inputs", *map(str, parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


STUDY_UID = _uid("study")


def _file_meta(sop_class: str, sop_uid: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(_uid("implementation"))
    return meta


def _phi_header(ds: Dataset, *, name: str = PHI.NAME, patient_id: str = PHI.PATIENT_ID) -> None:
    """The identifying fields of a hospital export, every one filled with a planted value."""
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.OtherPatientNames = PHI.OTHER_NAMES
    ds.PatientBirthDate = "19610314"
    ds.PatientSex = "F"
    ds.PatientAge = "060Y"
    ds.PatientAddress = PHI.ADDRESS
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20210602"
    ds.StudyTime = "101530"
    ds.AccessionNumber = PHI.ACCESSION
    ds.StudyID = PHI.STUDY_ID
    ds.InstitutionName = PHI.INSTITUTION
    ds.InstitutionAddress = PHI.ADDRESS
    ds.ReferringPhysicianName = PHI.PHYSICIAN
    ds.OperatorsName = PHI.OPERATOR
    ds.StudyDescription = PHI.STUDY_DESCRIPTION
    ds.SeriesDescription = PHI.SERIES_DESCRIPTION
    ds.ImageComments = PHI.IMAGE_COMMENTS
    ds.BodyPartExamined = PHI.BODY_PART
    block = ds.private_block(0x0029, PHI.PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PHI.PRIVATE_VALUE)
    block.add_new(0x02, "UN", PHI.PRIVATE_UN_VALUE.encode("ascii") + b" ")


def _dataset(sop_class: str, sop_uid: str, modality: str, syntax: str = ExplicitVRLittleEndian,
             charset: str | list[str] = "ISO_IR 100", **phi: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.Manufacturer = "MEDPIPE BAD INPUTS"
    _phi_header(ds, **phi)
    ds.SeriesInstanceUID = _uid("series", sop_uid)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.file_meta = _file_meta(sop_class, sop_uid, syntax)
    return ds


def _pixels(ds: Dataset, pixels: np.ndarray, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """Image pixel module + PixelData (native or lossless encapsulated), monochrome."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", PHI.RESCALE_TYPE
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW" if pixels.dtype.itemsize > 1 else "OB"
        return ds
    frame = get_encoder(syntax).encode(
        np.ascontiguousarray(pixels), rows=pixels.shape[0], columns=pixels.shape[1], samples_per_pixel=1,
        bits_allocated=ds.BitsAllocated, bits_stored=ds.BitsStored, pixel_representation=ds.PixelRepresentation,
        photometric_interpretation="MONOCHROME2", number_of_frames=1)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _dcm_bytes(ds: Dataset, *, part10: bool = True) -> bytes:
    buf = io.BytesIO()
    if part10:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:  # a raw dataset: no preamble, no file meta, implicit VR little endian
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _image(seed: int, shape: tuple[int, ...] = (16, 16), dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng([20240611, seed])
    high = 4096 if dtype == "uint16" else 256
    return rng.integers(1, high, size=shape).astype(dtype)


def _dx(tag: str, seed: int, syntax: str = ExplicitVRLittleEndian, sop_uid: str | None = None, size: int = 16,
        **kw: str) -> bytes:
    ds = _dataset(DX_SOP, sop_uid or _uid("dx", tag), "DX", syntax, **kw)
    return _dcm_bytes(_pixels(ds, _image(seed, (size, size)), syntax))


def _ct_slice(series: str, k: int) -> bytes:
    sop = _uid("ct", series, k)
    ds = _dataset(CT_SOP, sop, "CT")
    ds.SeriesInstanceUID = _uid("ct-series", series)
    ds.FrameOfReferenceUID = _uid("for", series)
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-4.0, -4.0, 2.5 * k]
    ds.SliceThickness = 2.5
    _pixels(ds, (_image(100 + k).astype(np.int16) - 1024).astype(np.int16))
    ds.RescaleIntercept, ds.RescaleType = "0", PHI.RESCALE_TYPE
    return _dcm_bytes(ds)


def _sr() -> bytes:
    ds = _dataset(BASIC_TEXT_SR_SOP, _uid("sr"), "SR")
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.TextValue = PHI.SR_TEXT
    ds.ContentSequence = Sequence([item])
    return _dcm_bytes(ds)


def _too_large_rle() -> bytes:
    """RLE Lossless whose header says 65535 x 65535 x 16 bit (8 GiB decoded) in ~600 bytes of pixel data."""
    ds = _dataset(SC_SOP, _uid("too-large"), "OT", RLELossless)
    ds.Rows = ds.Columns = 65535
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    # RLE header: 2 segments (high/low byte planes) of replicate runs "-127, 0" (128 zero bytes each)
    segment = bytes([0x81, 0x00]) * 134  # 268 bytes
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])  # 600 bytes
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _dcm_bytes(ds)


def _png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_image(seed, (size, size), "uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_image(seed, (16, 16), "uint8")).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tiff(data: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, photometric="minisblack", metadata=None)
    return buf.getvalue()


def _nifti(data_xyz: np.ndarray, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(np.ascontiguousarray(data_xyz), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_data_dtype(data_xyz.dtype)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def _volume(seed: int, shape: tuple[int, int, int] = (16, 16, 6)) -> np.ndarray:
    return np.random.default_rng([20240611, seed]).normal(100, 20, shape).astype(np.float32)


def _mask(seed: int, shape: tuple[int, int, int] = (16, 16, 6)) -> np.ndarray:
    return (np.random.default_rng([20240611, seed]).random(shape) > 0.7).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------------------------


def write_bad_inputs(root: Path, *, non_utf8_names: bool = True, links: bool = True) -> BadCorpus:
    """Write the bad-input corpus into ``root`` (SOURCE) and ``<root>.outside``; return what must happen to it.

    ``non_utf8_names=False`` / ``links=False`` leave out the names that are not valid UTF-8 and the symbolic
    links, for copies of the corpus into object stores (S3 keys are UTF-8 and have no links)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    outside = root.parent / (root.name + ".outside")
    outside.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    written = 0

    def put(rel: str | bytes, data: bytes, what: str, reason: str = "", *, listed: bool = True,
            unit_dims: int | None = None, label: str | None = None, notes: bool = False) -> None:
        nonlocal written
        raw = rel if isinstance(rel, bytes) else os.fsencode(rel)
        full = os.fsencode(root) + b"/" + raw
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        written += len(data)
        cases.append(Case(os.fsdecode(raw), what, reason, listed, unit_dims if not reason else None, label, notes))

    P = f"{PHI.NAME_PATH}_884211"  # the patient folder, as exports name it
    S = f"{P}/study01"

    # ---- DICOM: valid ones with PHI everywhere, and the ones that already pass --------------------------------
    valid = _dx("valid", 1)
    put(f"{S}/xr/dx_valid.dcm", valid, "valid DX, PHI in every header field", unit_dims=2, label="lesion")
    put(f"{S}/xr/dx_valid_zcopy.dcm", valid, "byte copy of dx_valid.dcm", "duplicate_instance")
    put(f"{S}/xr/dx_second.dcm", _dx("second", 2), "valid DX", unit_dims=2)
    collide = _uid("dx", "collide")
    put(f"{S}/uid/a_collision.dcm", _dx("collide-a", 3, sop_uid=collide), "SOPInstanceUID shared, other pixels",
        unit_dims=2)
    put(f"{S}/uid/b_collision.dcm", _dx("collide-b", 4, sop_uid=collide), "SOPInstanceUID shared, other pixels",
        unit_dims=2)
    put(f"{S}/syntax/rle.dcm", _dx("rle", 5, RLELossless), "RLE Lossless", unit_dims=2)
    put(f"{S}/syntax/j2k.dcm", _dx("j2k", 6, JPEG2000Lossless, size=64), "JPEG 2000 Lossless", unit_dims=2)
    put(f"{S}/syntax/IM_NOEXT", _dx("noext", 7), "DICOM without an extension", unit_dims=2)
    raw_ds = _dataset(DX_SOP, _uid("dx", "raw"), "DX")
    put(f"{S}/syntax/raw_no_preamble.dcm", _dcm_bytes(_pixels(raw_ds, _image(8)), part10=False),
        "raw dataset: no preamble, no file meta, implicit VR", unit_dims=2)
    put(f"{S}/charset/japanese_ir87.dcm",
        _dx("jp", 9, charset=["", "ISO 2022 IR 87"], name=PHI.JP_NAME, patient_id=PHI.JP_PATIENT_ID),
        "ISO 2022 IR 87: Japanese ideographic and phonetic name", unit_dims=2)
    put(f"{S}/charset/utf8_ir192.dcm", _dx("utf8", 10, charset="ISO_IR 192", name=PHI.UTF8_NAME),
        "ISO_IR 192 (UTF-8) name", unit_dims=2)
    for k in range(4):
        put(f"{S}/ct/IM{k + 1:04d}", _ct_slice("ct", k), "CT series, 4 slices 16x16 (one volume)")
    put("outside.dcm", _dx("inside-outside", 11), "a file named like the traversal row's target", unit_dims=2)
    put(f"{P}/{PHI.FILE_NAME}.dcm", _dx("named", 12), "file name holding the patient's name", unit_dims=2)
    if non_utf8_names:
        put(b"ZZBADBYTES_\xff\xfeQUINCY.dcm", _dx("badbytes", 13), "file name that is not valid UTF-8", unit_dims=2)

    # ---- DICOM: defective ------------------------------------------------------------------------------------
    whole = _dx("truncated", 14)
    put(f"{S}/bad/truncated.dcm", whole[: int(len(whole) * 0.6)], "first 60 % of a DX file", "truncated")
    put(f"{S}/bad/zero.dcm", b"", "zero bytes, .dcm", "not_dicom")
    put(f"{S}/bad/report_text.dcm", f"Report for {PHI.NAME}\nThis is text.\n".encode() * 4, "text named .dcm",
        "not_dicom")
    put(f"{S}/bad/photo_named.dcm", _png(15), "a PNG named .dcm", "not_dicom")
    nopix = _dataset(DX_SOP, _uid("dx", "nopix"), "DX")
    nopix.Rows, nopix.Columns, nopix.BitsAllocated, nopix.SamplesPerPixel = 16, 16, 16, 1
    put(f"{S}/bad/no_pixels.dcm", _dcm_bytes(nopix), "DX header without PixelData", "no_pixel_data")
    put(f"{S}/bad/report_sr.dcm", _sr(), "Basic Text SR with the name in its text", "non_image_dicom")
    put(f"{S}/bad/too_large_rle.dcm", _too_large_rle(), "RLE, header 65535x65535, 600 bytes of pixels",
        "too_large")

    # ---- other formats ----------------------------------------------------------------------------------------
    X = f"{P}/other"
    put(f"{X}/zero.bin", b"", "zero bytes, unknown extension", "unsupported_format")
    put(f"{X}/zero.png", b"", "zero bytes, .png", "unreadable_image")
    put(f"{X}/zero.nii.gz", b"", "zero bytes, .nii.gz", "unreadable_nifti")
    put(f"{X}/notes.xyz", f"{PHI.NAME} {PHI.PATIENT_ID}\n".encode(), "text, unknown extension",
        "unsupported_format")
    png = _png(16)
    put(f"{X}/corrupt.png", png[: len(png) // 2], "PNG cut in its image data", "unreadable_image")
    nii = _nifti(np.random.default_rng(0).integers(0, 255, (32, 32, 16)).astype(np.uint8))
    put(f"{X}/corrupt.nii.gz", nii[: len(nii) // 2], "gzip NIfTI cut in the voxel data", "unreadable_nifti")
    raw_nii = _nifti(_volume(17), compress=False)
    put(f"{X}/truncated.nii", raw_nii[: len(raw_nii) - 200], "uncompressed NIfTI missing its last bytes",
        "unreadable_nifti")
    put(f"{X}/nan_all.nii.gz", _nifti(np.full((16, 16, 6), np.nan, np.float32)), "NIfTI, every voxel NaN",
        "non_finite_pixels")
    some = _volume(18)
    some[2:5, 3:7, 1] = np.nan
    some[0, 0, 0] = np.inf
    put(f"{X}/nan_some.nii.gz", _nifti(some), "NIfTI, some voxels NaN / inf", unit_dims=3, notes=True)
    tif = _image(19, (16, 16), "uint16").astype(np.float32)
    tif[4:6, 4:9] = np.nan
    put(f"{X}/nan_some.tif", _tiff(tif), "float32 TIFF with NaN pixels", unit_dims=2, notes=True)
    put(f"{X}/single_slice.nii.gz", _nifti(_volume(20, (16, 16, 1))), "NIfTI with one slice (a 2D image)",
        unit_dims=2)
    put(f"{X}/volume.nii.gz", _nifti(_volume(21)), "NIfTI volume", unit_dims=3)
    put(f"{X}/tiff16.tif", _tiff(_image(22, (16, 20), "uint16")), "16-bit grayscale TIFF", unit_dims=2)
    put(f"{X}/jpeg_named.png", _jpeg(23), "a JPEG named .png (decoded by content)", unit_dims=2)
    put(f"{X}/photo.jpg", _jpeg(24), "JPEG", unit_dims=2)
    put(f"{X}/{PHI.UTF8_FILE}.png", _png(25), "UTF-8 file name with the patient's name", unit_dims=2,
        label="none")
    put(f"{X}/{PHI.NEWLINE}\nALICE.png", _png(26), "file name holding a newline", unit_dims=2)
    if non_utf8_names:
        put(b"ZZBADDIR_\xe9MARTHA/study01/img.png", _png(27), "folder name that is not valid UTF-8", unit_dims=2)
    put(f"{X}/id_label.png", _png(28), "manifest label is the patient's name", unit_dims=2)
    put(f"{X}/id_number_label.png", _png(29), "manifest label is a bare identifier number", unit_dims=2)
    put(f"{X}/manifest_patient.png", _png(30), "manifest patient_id holds PHI", unit_dims=2, label="none")

    # ---- masks ------------------------------------------------------------------------------------------------
    M = f"{P}/seg"
    put(f"{M}/vol_goodmask.nii.gz", _nifti(_volume(31)), "volume with a good mask", unit_dims=3, label="lesion")
    put(f"{M}/{PHI.MASK_NAME}_good.nii.gz", _nifti(_mask(32)), "its mask (ingested as the mask)")
    put(f"{M}/vol_missingmask.nii.gz", _nifti(_volume(33)), "volume whose mask file is missing", unit_dims=3,
        label="lesion")
    put(f"{M}/vol_badmask.nii.gz", _nifti(_volume(34)), "volume whose mask has another shape", unit_dims=3,
        label="lesion")
    put(f"{M}/mask_small.nii.gz", _nifti(_mask(35, (8, 8, 6))), "mask of another shape", "mask_shape_mismatch")
    put(f"{M}/orphan_mask.nii.gz", _nifti(_mask(36)), "mask whose image does not exist", "mask_without_image")

    # ---- medpipe.demo's defective files (the kinds that already pass, kept in the same corpus) ------------------
    for rel, reason in write_defective_files(root / "defective").items():
        data = (root / "defective" / rel).read_bytes()
        written += len(data)
        cases.append(Case(f"defective/{rel}", f"medpipe.demo defective file {rel}", reason))

    # ---- hidden files (not listed) ------------------------------------------------------------------------------
    put(".DS_Store", b"\0\0\0\1Bud1" + PHI.NAME.encode(), "hidden file", listed=False)
    put(f"{P}/.hidden/{PHI.FILE_NAME}.dcm", _dx("hidden", 37), "file in a hidden folder", listed=False)
    os.makedirs(root / "empty_folder", exist_ok=True)

    # ---- links --------------------------------------------------------------------------------------------------
    external: list[str] = []
    if links:
        # a link inside SOURCE to a folder already listed: the real paths sort first, the link adds nothing
        target = f"{S}/xr"
        late = f"{P}/zlink_{PHI.LINK_NAME}"
        os.symlink("study01/xr", root / late)
        for c in [c for c in cases if c.path.startswith(target + "/")]:
            cases.append(Case(late + c.path[len(target):], f"{c.what}, seen again through a later link",
                              listed=False))
        # a link inside SOURCE that sorts before its target: the files are listed (once) through the link
        early = f"{P}/AAlink_{PHI.LINK_NAME}"
        for k in range(2):
            put(f"{P}/study02/linked/img{k}.png", _png(40 + k), "PNG whose folder a link sorts before", listed=False)
            cases.append(Case(f"{early}/img{k}.png", "PNG listed through a link inside SOURCE", unit_dims=2))
        os.symlink("study02/linked", root / early)

        (outside / f"{PHI.OUTSIDE}.dcm").write_bytes(_dx("outside", 38))
        (outside / "sub").mkdir(exist_ok=True)
        (outside / "sub" / "img.png").write_bytes(_png(39))
        external += [f"{P}/{PHI.OUTSIDE}_dir", f"{P}/{PHI.OUTSIDE}_file.dcm", f"{P}/dangling_{PHI.OUTSIDE}.dcm"]
        os.symlink(os.path.relpath(outside, root / P), root / external[0])  # a folder outside SOURCE
        os.symlink(os.path.relpath(outside / f"{PHI.OUTSIDE}.dcm", root / P), root / external[1])  # a file outside
        os.symlink("no_such_file.dcm", root / external[2])  # leads nowhere
        for rel in external:
            cases.append(Case(rel, "link leaving SOURCE / leading nowhere: not followed, reported", listed=False))

    # ---- the manifest -------------------------------------------------------------------------------------------
    manifest = f"labels_{PHI.MANIFEST_NAME}_884211.csv"
    rows = [
        ("path", "label", "mask", "patient_id"),
        (f"{S}/xr/dx_valid.dcm", "lesion", "", ""),  # line 2
        (f"{S}/xr/dx_valid.dcm", "none", "", ""),  # line 3: duplicate row
        ("../outside.dcm", "lesion", "", ""),  # line 4: climbs out of SOURCE (and SOURCE/outside.dcm exists)
        (f"{X}/id_label.png", PHI.NAME, "", ""),  # line 5: label that is an identifier (a name)
        (f"{X}/id_number_label.png", PHI.ID_LABEL, "", ""),  # line 6: label that is an identifier (a number)
        (f"{X}/{PHI.UTF8_FILE}.png", "none", "", ""),  # line 7
        (f"{X}/manifest_patient.png", "none", "", PHI.MANIFEST_PATIENT),  # line 8
        (f"{M}/vol_goodmask.nii.gz", "lesion", f"{M}/{PHI.MASK_NAME}_good.nii.gz", ""),  # line 9
        (f"{M}/vol_missingmask.nii.gz", "lesion", f"{M}/{PHI.MASK_NAME}_missing.nii.gz", ""),  # line 10
        (f"{M}/vol_badmask.nii.gz", "lesion", f"{M}/mask_small.nii.gz", ""),  # line 11
        (f"{M}/{PHI.NAME_PATH}_gone.nii.gz", "lesion", f"{M}/orphan_mask.nii.gz", ""),  # line 12: no image
    ]
    text = "\ufeff" + "".join(",".join(r) + "\r\n" for r in rows)  # BOM and CRLF, as spreadsheets write it
    (root / manifest).write_bytes(text.encode("utf-8"))
    written += len(text.encode())
    issues = {"duplicate row": 3, "path traversal": 4, "identifier-like label (name)": 5,
              "identifier-like label (number)": 6, "mask file not found": 10, "image not found": 12}

    # ---- expectations ---------------------------------------------------------------------------------------------
    listed = [c for c in cases if c.listed]
    reasons: dict[str, int] = {}
    for c in listed:
        if c.reason:
            reasons[c.reason] = reasons.get(c.reason, 0) + 1
    quarantined = sum(reasons.values())
    units2 = [c for c in listed if c.unit_dims == 2 and not c.reason]
    units3 = [c for c in listed if c.unit_dims == 3 and not c.reason]
    phi = sorted({v for k, v in vars(PHI).items() if not k.startswith("_") and isinstance(v, str)
                  and len(v) >= 5}, key=lambda s: (-len(s), s))
    phi += [PHI.NAME.replace("^", " "), "ALICE^ZZPLANTED", "ALICE ZZPLANTED",  # the name as other tools write it
            "ROE^RICHARD", "ROE_RICHARD", "ACC9990001"]  # the fake patient of medpipe.demo's defective files
    total = written + sum(p.stat().st_size for p in outside.rglob("*") if p.is_file())
    return BadCorpus(
        root=root, outside=outside, manifest=manifest, cases=cases, expected_reasons=dict(sorted(reasons.items())),
        discovered=len(listed), ingested_min=len(listed) - quarantined,
        excluded_min={"3d": len(units2), "2d": len(units3) + 1},  # 2d: + the CT series
        phi=phi, phi_tokens=[PHI.ID_LABEL],
        manifest_issue_lines=issues, external_links=external, collision_pairs=2, total_bytes=total,
    )
