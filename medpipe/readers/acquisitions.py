"""Split one DICOM series (or the frames of one enhanced multi-frame file) into acquisitions, like dcm2niix.

Pure functions over non-identifying header facts (:class:`SliceInfo`), so the split can be planned on the driver
from what workers probed. The rules, in the order they apply (each level only names the split it makes):

1. multi-frame files (``frames > 1``) are each their own acquisition (``file1``...), read whole;
2. image class: LOCALIZER (``localizer``, always 2D images), DERIVED (``derived``) vs primary (``original``);
3. size: Rows/Columns/SamplesPerPixel/PixelSpacing (``size1``...);
4. orientation within :data:`ORIENTATION_TOL` (``orient1``...);
5. echo: EchoNumbers / EchoTime (``echo1``... by ascending echo);
6. when positions repeat: TemporalPositionIndex (``phase1``...), AcquisitionNumber (``acq1``...),
   TriggerTime (``phase1``...), the first key that varies;
7. positions that still repeat: repeats ordered by InstanceNumber (``rep1``...);
8. slice spacing that is not regular (a missing slice, a change of spacing): medpipe *splits* at the gap
   (``part1``...) rather than resampling; a run of one slice after splitting becomes a 2D image.

Slices without position/orientation and lone slices are 2D images (``volume=False``). A slice step that is not
parallel to the normal (gantry tilt) stays one volume with a note; the reader records the sheared affine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pydicom

    from .probe import FileProbe

ORIENTATION_TOL = 1e-3  # max abs difference of direction cosines for "same orientation" (~0.06 deg)
POSITION_TOL_MM = 0.01  # slices closer than this along the normal share a position
TILT_NOTE_DEG = 0.1  # smaller angles between slice step and normal are float noise

# ImageType defined terms (PS3.3 C.7.6.1.1.2, C.8.16.1, C.8.13.1.1.1); anything else (vendor free text) is dropped.
IMAGE_TYPE_TERMS = frozenset({
    "ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY", "AXIAL", "LOCALIZER", "REFORMATTED", "MIXED", "MPR", "MIP",
    "MINIP", "PROJECTION IMAGE", "VOLUME", "SUBTRACTION", "ANGIO", "CARDIAC", "DIFFUSION", "ADC", "FLOW_ENCODED",
    "PERFUSION", "FMRI", "T1", "T2", "PROTON_DENSITY", "MOTION_CORRECTED", "STATISTICAL", "DYNAMIC", "REFERENCE",
})


@dataclass(frozen=True)
class SliceInfo:
    """Non-identifying per-file header facts that series assembly needs (safe to send from a worker to the driver)."""

    rows: int | None
    columns: int | None
    samples_per_pixel: int
    frames: int
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    instance_number: int | None
    echo_number: int | None  # EchoNumbers
    echo_time: float | None
    temporal_index: int | None  # TemporalPositionIndex / TemporalPositionIdentifier
    acquisition_number: int | None
    trigger_time: float | None
    image_type: tuple[str, ...]  # upper-cased ImageType defined terms only, never free text
    pixel_spacing: tuple[float, float] | None

    @classmethod
    def from_probe(cls, probe: FileProbe) -> SliceInfo:
        """The assembly facts of one probed file."""
        return cls(
            rows=probe.rows, columns=probe.columns, samples_per_pixel=probe.samples_per_pixel, frames=probe.frames,
            position=probe.position, orientation=probe.orientation, instance_number=probe.instance_number,
            echo_number=probe.echo_number, echo_time=probe.echo_time, temporal_index=probe.temporal_index,
            acquisition_number=probe.acquisition_number, trigger_time=probe.trigger_time,
            image_type=clean_image_type(probe.image_type), pixel_spacing=probe.pixel_spacing,
        )


@dataclass(frozen=True)
class Acquisition:
    """One acquisition of a series: ``members`` index the input (slice order for a volume)."""

    members: tuple[int, ...]
    name: str  # "" for a single-acquisition series, else a technical name (echo2, localizer, part2, ...)
    volume: bool  # True: one 3D volume; False: each member is its own 2D image (or whole multi-frame file)
    notes: tuple[str, ...] = ()


def clean_image_type(values: Sequence[str] | None) -> tuple[str, ...]:
    """Upper-cased ImageType values that are defined terms (free text dropped, order kept)."""
    out = []
    for value in values or ():
        term = str(value).strip().upper()
        if term in IMAGE_TYPE_TERMS:
            out.append(term)
    return tuple(out)


# ---------------------------------------------------------------- geometry helpers


def normal_of(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines)."""
    cos = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    normal = np.cross(cos[0], cos[1])
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-9 else normal


def same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    """Direction cosines equal within :data:`ORIENTATION_TOL`."""
    return bool(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= ORIENTATION_TOL)


def spacing_tol(spacing: float) -> float:
    """Allowed deviation (mm) of one slice step from the regular one: 0.11 mm (positions rounded to 0.1 mm) or 5%."""
    return max(0.11, 0.05 * abs(spacing))


def _reference_step(steps: np.ndarray) -> np.ndarray:
    """The most common step vector (steps within tolerance of each other count together); ties: the shortest."""
    best: tuple[int, float] | None = None
    ref = steps[0]
    for step in steps:
        close = np.linalg.norm(steps - step, axis=1) <= spacing_tol(float(np.linalg.norm(step)))
        score = (int(close.sum()), -float(np.linalg.norm(step)))
        if best is None or score > best:
            best, ref = score, np.median(steps[close], axis=0)
    return ref


def regular_runs(positions: np.ndarray) -> list[list[int]]:
    """Split positions (already sorted along the normal) into runs with one regular step vector.

    A run continues while each step is within :func:`spacing_tol` of the most common step; what is left over
    (slices around a gap, a stretch with another spacing) is split the same way. Returns index runs in order.
    """
    n = len(positions)
    if n < 2:
        return [list(range(n))]
    steps = np.diff(positions, axis=0)
    ref = _reference_step(steps)
    tol = spacing_tol(float(np.linalg.norm(ref)))
    regular = np.linalg.norm(steps - ref, axis=1) <= tol
    if not regular.any():  # cannot happen for the most common step; guards the recursion
        return [[i] for i in range(n)]
    runs: list[list[int]] = []
    leftover: list[int] = []
    current = [0]
    for i in range(1, n + 1):
        if i < n and regular[i - 1]:
            current.append(i)
            continue
        if len(current) > 1:
            runs.append(current)
        else:
            leftover.extend(current)
        current = [i]
    # leftover slices form consecutive stretches; split each on its own terms
    stretches: list[list[int]] = []
    for i in leftover:
        if stretches and i == stretches[-1][-1] + 1:
            stretches[-1].append(i)
        else:
            stretches.append([i])
    for stretch in stretches:
        runs.extend([[stretch[j] for j in r] for r in regular_runs(positions[stretch])])
    return sorted(runs, key=lambda r: r[0])


def tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the slice step vector and the slice normal (gantry tilt), in degrees."""
    norm = float(np.linalg.norm(step))
    if norm < 1e-9:
        return 0.0
    return math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / norm)))


def _mm(value: float) -> str:
    return f"{value:.1f}" if abs(value - round(value, 1)) < 0.005 else f"{value:.2f}"


# ---------------------------------------------------------------- split


@dataclass
class _Group:
    members: list[int]
    parts: list[str]
    notes: list[str]


def _order_key(info: SliceInfo, index: int) -> tuple:
    return (info.instance_number is None, info.instance_number or 0, index)


def _partition(group: _Group, slices: Sequence[SliceInfo], key: Callable[[int], Hashable],
               label: Callable[[int, Any], str], sort_values: bool = False) -> list[_Group]:
    """Split ``group`` by ``key``; subgroups are ordered by key value or first member, named only if >1."""
    buckets: dict[Hashable, list[int]] = {}
    for i in group.members:
        buckets.setdefault(key(i), []).append(i)
    if len(buckets) == 1:
        return [group]
    if sort_values:
        items = sorted(buckets.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0))
    else:
        items = sorted(buckets.items(), key=lambda kv: min(_order_key(slices[i], i) for i in kv[1]))
    return [_Group(members, group.parts + [label(k, value)], list(group.notes))
            for k, (value, members) in enumerate(items, start=1)]


def _attr_key(slices: Sequence[SliceInfo], keyword: str) -> Callable[[int], Hashable]:
    return lambda i: getattr(slices[i], keyword)


def _numbered(part: str) -> Callable[[int, Any], str]:
    return lambda k, _value: f"{part}{k}"


def _orientation_clusters(members: list[int], slices: Sequence[SliceInfo]) -> dict[int, int]:
    """Cluster index per member: orientations within tolerance of a cluster's first member share it."""
    reps: list[tuple[float, ...]] = []
    out: dict[int, int] = {}
    for i in sorted(members, key=lambda m: _order_key(slices[m], m)):
        orient = slices[i].orientation
        if orient is None:
            out[i] = -1
            continue
        for c, rep in enumerate(reps):
            if same_orientation(orient, rep):
                out[i] = c
                break
        else:
            reps.append(orient)
            out[i] = len(reps) - 1
    return out


def _position_clusters(members: list[int], slices: Sequence[SliceInfo], normal: np.ndarray) -> dict[int, int]:
    """Cluster index per member: positions within POSITION_TOL_MM along the normal share one."""
    keys = sorted((float(np.asarray(slices[i].position) @ normal), i) for i in members)
    out: dict[int, int] = {}
    cluster, last = -1, None
    for value, i in keys:
        if last is None or value - last > POSITION_TOL_MM:
            cluster += 1
        out[i] = cluster
        last = value
    return out


def _class_of(info: SliceInfo) -> str:
    if info.frames > 1:
        return "file"
    if "LOCALIZER" in info.image_type:
        return "localizer"
    return "derived" if "DERIVED" in info.image_type else "original"


def _size_key(info: SliceInfo) -> tuple:
    spacing = tuple(round(v, 3) for v in info.pixel_spacing) if info.pixel_spacing else None
    return (info.rows, info.columns, info.samples_per_pixel, spacing)


def _echo_key(info: SliceInfo) -> tuple:
    time = round(info.echo_time, 2) if info.echo_time is not None else None
    return (info.echo_number if info.echo_number is not None else -1, time if time is not None else -1.0)


def _geometric(group: _Group, slices: Sequence[SliceInfo], out: list[tuple[_Group, bool]]) -> None:
    """Split one class/size/orientation/echo group by temporal keys, repeats and gaps; append results to ``out``."""
    placed = [i for i in group.members if slices[i].position is not None and slices[i].orientation is not None]
    loose = sorted(set(group.members) - set(placed))
    if loose and placed:
        out.append((_Group(loose, group.parts + ["nopos"], group.notes + ["no slice position"]), False))
        group = _Group(placed, group.parts, group.notes)
    elif loose:
        out.append((_Group(loose, group.parts, group.notes + ["no slice position"]), False))
        return
    normal = normal_of(slices[group.members[0]].orientation)  # type: ignore[arg-type]
    clusters = _position_clusters(group.members, slices, normal)
    subgroups = [group]
    if len(set(clusters.values())) < len(group.members):  # positions repeat: temporal keys first
        for keyword, part in (("temporal_index", "phase"), ("acquisition_number", "acq"), ("trigger_time", "phase")):
            values = {getattr(slices[i], keyword) for i in group.members}
            if len(values) > 1:
                subgroups = _partition(group, slices, _attr_key(slices, keyword), _numbered(part), sort_values=True)
                break
    for sub in subgroups:
        _repeats_and_gaps(sub, slices, normal, out)


def _repeats_and_gaps(group: _Group, slices: Sequence[SliceInfo], normal: np.ndarray,
                      out: list[tuple[_Group, bool]]) -> None:
    clusters = _position_clusters(group.members, slices, normal)
    seen: dict[int, int] = {}
    rep_of: dict[int, int] = {}
    for i in sorted(group.members, key=lambda m: _order_key(slices[m], m)):
        rep_of[i] = seen.get(clusters[i], 0)
        seen[clusters[i]] = rep_of[i] + 1
    n_reps = max(rep_of.values()) + 1
    reps = [
        _Group([i for i in group.members if rep_of[i] == r],
               group.parts + ([f"rep{r + 1}"] if n_reps > 1 else []),
               group.notes + ([f"repeat {r + 1} of {n_reps} at identical positions (by InstanceNumber)"]
                              if n_reps > 1 else []))
        for r in range(n_reps)
    ]
    for rep in reps:
        order = sorted(rep.members, key=lambda i: (float(np.asarray(slices[i].position) @ normal), i))
        if len(order) < 2:
            out.append((_Group(order, rep.parts, rep.notes), False))
            continue
        positions = np.asarray([slices[i].position for i in order], dtype=np.float64)
        runs = regular_runs(positions)
        regular = float(abs(_reference_step(np.diff(positions, axis=0)) @ normal))
        for k, run in enumerate(runs, start=1):
            notes = list(rep.notes)
            neighbours = ([(runs[k - 2][-1], run[0])] if k > 1 else []) + ([(run[-1], runs[k][0])] if k < len(runs) else [])
            for a, b in neighbours:
                gap = float((positions[b] - positions[a]) @ normal)
                notes.append(f"split at a slice gap ({_mm(gap)} mm where {_mm(regular)} mm is regular)")
            members = [order[j] for j in run]
            if len(run) > 1:
                step = (positions[run[-1]] - positions[run[0]]) / (len(run) - 1)
                tilt = tilt_degrees(step, normal)
                if tilt > TILT_NOTE_DEG:
                    notes.append(f"gantry tilt {tilt:.1f} deg")
            parts = rep.parts + ([f"part{k}"] if len(runs) > 1 else [])
            out.append((_Group(members, parts, notes), len(run) > 1))


def split_series(slices: Sequence[SliceInfo]) -> list[Acquisition]:
    """Split one SeriesInstanceUID's files into acquisitions (deterministic; every input index in exactly one).

    See the module docstring for the rules. Slice spacing that is not regular is split at the gap into
    ``part1``, ``part2``...: medpipe splits rather than resamples (dcm2niix writes an equalised ``_Eq`` copy),
    and a run of one slice after splitting becomes a 2D image.
    """
    if not slices:
        return []
    root = _Group(list(range(len(slices))), [], [])
    results: list[tuple[_Group, bool]] = []
    files = sorted((i for i in root.members if slices[i].frames > 1), key=lambda i: _order_key(slices[i], i))
    singles = [i for i in root.members if slices[i].frames <= 1]
    has_classes = len({_class_of(slices[i]) for i in root.members}) > 1 or len(files) > 1
    for k, i in enumerate(files, start=1):
        results.append((_Group([i], [f"file{k}"] if has_classes else [], ["multi-frame file"]), False))
    if singles:
        classes = _partition(_Group(singles, [], []), slices, lambda i: _class_of(slices[i]), lambda _k, v: v)
        if len(classes) == 1 and has_classes:  # single-frame files next to multi-frame files: name the class
            classes[0].parts.append(_class_of(slices[singles[0]]))
        for cls in sorted(classes, key=lambda g: ("original", "derived", "localizer").index(_class_of(slices[g.members[0]]))):
            if _class_of(slices[cls.members[0]]) == "localizer":
                members = sorted(cls.members, key=lambda i: _order_key(slices[i], i))
                results.append((_Group(members, cls.parts, ["localizer/scout"]), False))
                continue
            for size in _partition(cls, slices, lambda i: _size_key(slices[i]), lambda k, _v: f"size{k}"):
                orient = _orientation_clusters(size.members, slices)
                for og in _partition(size, slices, orient.__getitem__, lambda k, _v: f"orient{k}"):
                    for echo in _partition(og, slices, lambda i: _echo_key(slices[i]), lambda k, _v: f"echo{k}",
                                           sort_values=True):
                        _geometric(echo, slices, results)
    acquisitions = []
    for group, volume in results:
        members = group.members if volume else sorted(group.members, key=lambda i: _order_key(slices[i], i))
        acquisitions.append(Acquisition(tuple(members), "-".join(group.parts), volume,
                                        tuple(dict.fromkeys(group.notes))))
    if len(acquisitions) > 1:
        acquisitions = [a if a.name else Acquisition(a.members, "main", a.volume, a.notes) for a in acquisitions]
    else:
        acquisitions = [Acquisition(a.members, "", a.volume, a.notes) for a in acquisitions]
    return acquisitions


# ---------------------------------------------------------------- enhanced multi-frame


def _first(item: Any, seq_keyword: str) -> Any:
    try:
        seq = item.get(seq_keyword) if item is not None else None
        return seq[0] if seq else None
    except (AttributeError, IndexError, TypeError):
        return None


def _value(item: Any, keyword: str, cast: Callable[[Any], Any]) -> Any:
    try:
        value = item.get(keyword) if item is not None else None
        if value is None or value == "":
            return None
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = value[0]
        return cast(value)
    except (TypeError, ValueError, IndexError, AttributeError):
        return None


def _floats(item: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        value = item.get(keyword) if item is not None else None
        out = tuple(float(v) for v in value) if value is not None and value != "" else None
        return out if out is not None and len(out) == n and all(map(math.isfinite, out)) else None
    except (TypeError, ValueError):
        return None


def _frame_item(ds: pydicom.Dataset, frame: int, seq_keyword: str) -> Any:
    """First item of ``seq_keyword`` for ``frame``: per-frame groups first, then shared groups."""
    try:
        per_frame = ds.PerFrameFunctionalGroupsSequence[frame]
    except (AttributeError, IndexError, TypeError):
        per_frame = None
    item = _first(per_frame, seq_keyword)
    if item is None:
        item = _first(_first(ds, "SharedFunctionalGroupsSequence"), seq_keyword)
    return item


def _frame_type(item: Any) -> tuple[str, ...]:
    try:
        value = item.get("FrameType") if item is not None else None
    except AttributeError:
        return ()
    return clean_image_type([value] if isinstance(value, str) else value)


def frame_infos(ds: pydicom.Dataset) -> list[SliceInfo]:
    """Per-frame assembly facts of an enhanced multi-frame dataset from its functional groups (no pixels needed)."""
    frames = _value(ds, "NumberOfFrames", int) or 1
    out = []
    for f in range(frames):
        content = _frame_item(ds, f, "FrameContentSequence")
        echo = _frame_item(ds, f, "MREchoSequence")
        cardiac = _frame_item(ds, f, "CardiacSynchronizationSequence")
        measures = _frame_item(ds, f, "PixelMeasuresSequence")
        frame_type = _frame_item(ds, f, "MRImageFrameTypeSequence") or _frame_item(ds, f, "CTImageFrameTypeSequence")
        out.append(SliceInfo(
            rows=_value(ds, "Rows", int), columns=_value(ds, "Columns", int),
            samples_per_pixel=_value(ds, "SamplesPerPixel", int) or 1, frames=1,
            position=_floats(_frame_item(ds, f, "PlanePositionSequence"), "ImagePositionPatient", 3),  # type: ignore[arg-type]
            orientation=_floats(_frame_item(ds, f, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
            instance_number=f,  # frame order stands for acquisition order (orders repeats)
            echo_number=None, echo_time=_value(echo, "EffectiveEchoTime", float),
            temporal_index=_value(content, "TemporalPositionIndex", int), acquisition_number=None,
            trigger_time=_value(cardiac, "NominalCardiacTriggerDelayTime", float),
            image_type=_frame_type(frame_type),
            pixel_spacing=_floats(measures, "PixelSpacing", 2),  # type: ignore[arg-type]
        ))
    return out


def frame_acquisitions(ds: pydicom.Dataset) -> list[Acquisition]:
    """Split the frames of an enhanced multi-frame dataset into acquisitions (members = frame indices).

    Keys: FrameContentSequence StackID (``stack1``...), then as :func:`split_series`: orientation, MR effective
    echo time, TemporalPositionIndex, cardiac trigger delay, repeated positions (ordered by frame number) and
    slice gaps. Every acquisition is read with ``read_dicom_file(path, fs, frames=members)``: a volume (frames in
    slice order) or exactly one frame (a 2D image). Frames without per-frame geometry are one acquisition in
    stored order (InStackPositionNumber is not used: positions decide the order).
    """
    infos = frame_infos(ds)
    if not infos or any(i.position is None or i.orientation is None for i in infos):
        return [Acquisition(tuple(range(len(infos) or 1)), "", True)]
    stack_ids = [_value(_frame_item(ds, f, "FrameContentSequence"), "StackID", str) for f in range(len(infos))]
    stacks = list(dict.fromkeys(stack_ids))  # in order of first frame
    groups: list[Acquisition] = []
    for s_index, stack in enumerate(stacks, start=1):
        members = [k for k, s in enumerate(stack_ids) if s == stack]
        prefix = f"stack{s_index}" if len(stacks) > 1 else ""
        for acq in split_series([infos[k] for k in members]):
            name = "-".join(p for p in (prefix, acq.name) if p)
            frames = [members[m] for m in acq.members]
            if acq.volume or len(frames) == 1:
                groups.append(Acquisition(tuple(frames), name, acq.volume, acq.notes))
            else:  # 2D frames: one acquisition each, so frames=members always reads one image
                groups.extend(Acquisition((f,), "-".join(p for p in (name, f"frame{k}") if p), False, acq.notes)
                              for k, f in enumerate(frames, start=1))
    if len(groups) == 1:
        return [Acquisition(groups[0].members, "", groups[0].volume, groups[0].notes)]
    return [g if g.name else Acquisition(g.members, "main", g.volume, g.notes) for g in groups]
