"""Shared types and rules for all readers: the decoded image, the quarantine exception, the size limit, the
finite-pixel rule and the line between a bad file (quarantine) and unreachable storage (infrastructure)."""

from __future__ import annotations

import errno
import functools
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ParamSpec, TypeVar

import numpy as np
import pydicom

from medpipe.errors import InfrastructureError

P = ParamSpec("P")
T = TypeVar("T")


class QuarantineReason(StrEnum):
    """Why an input file (or unit) was set aside instead of being ingested."""

    not_dicom = "not_dicom"
    truncated = "truncated"
    no_pixel_data = "no_pixel_data"
    mixed_series_sizes = "mixed_series_sizes"
    unreadable_nifti = "unreadable_nifti"
    duplicate_instance = "duplicate_instance"
    non_image_dicom = "non_image_dicom"
    unsupported_format = "unsupported_format"
    decode_error = "decode_error"
    unreadable_image = "unreadable_image"
    missing_mask = "missing_mask"
    mask_shape_mismatch = "mask_shape_mismatch"
    too_large = "too_large"  # decoded size from the header exceeds max_image_bytes
    non_finite_pixels = "non_finite_pixels"  # no finite pixel at all (all NaN / inf)


class UnreadableFile(Exception):
    """Raised by readers when an input cannot be decoded; never carries partial data.

    ``detail`` holds technical facts only (sizes, tags, exception class names), never header values
    or paths, because both may contain PHI.
    """

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        self.reason = QuarantineReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")

    def __reduce__(self):  # keep picklable across Dask/Prefect process boundaries
        return (type(self), (self.reason, self.detail))


@dataclass
class DecodedImage:
    """A decoded image in channel-first layout, see docs/design.md.

    Pixels are always finite: readers pass floating-point data through :func:`finite_pixels`, which sets
    NaN/±inf to the finite minimum of the image (background) and adds the note
    ``"<n> non-finite pixels set to the image minimum"``; an image with no finite pixel raises
    ``UnreadableFile(non_finite_pixels)``.
    """

    pixels: np.ndarray  # 2D: (C, Y, X); 3D: (C, Z, Y, X). CT in HU (int16 when exact, else float32), others native.
    spacing: tuple[float, ...]  # mm per spatial axis in array order: (dy, dx) or (dz, dy, dx)
    modality: str
    header: pydicom.Dataset | None  # first DICOM dataset of the unit without pixel data
    affine: np.ndarray | None = None  # 4x4 index (x, y, z) -> world
    orientation: str | None = None  # axis codes of the (x, y, z) index axes, e.g. "LPS"
    notes: tuple[str, ...] = ()  # technical facts about the decoding (gantry tilt, spacing jitter, ...)


# ---------------------------------------------------------------- size limit


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:.1f}" if mib >= 0.1 else f"{mib:.2g}"


def check_image_bytes(width: int, height: int, frames: int, nbytes: int, limit: int | None) -> None:
    """Raise ``too_large`` when decoding would allocate ``nbytes`` (from header facts) over ``limit`` bytes.

    Called before any pixel is decoded; ``limit`` None means no limit.
    """
    if limit is not None and nbytes > limit:
        raise UnreadableFile(
            QuarantineReason.too_large,
            f"{width}x{height}x{frames} needs {_mib(nbytes)} MiB > limit {_mib(limit)} MiB",
        )


# ---------------------------------------------------------------- finite pixels


def finite_pixels(pixels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Return (pixels, notes) with NaN/±inf set to the image's finite minimum; the one non-finite rule.

    Integer data is returned as is. When some pixels are non-finite they are replaced (on a copy if the
    array is read-only) and the note ``"<n> non-finite pixels set to the image minimum"`` is returned; when
    none is finite, ``UnreadableFile(non_finite_pixels)`` is raised. The check costs one min/max pass when all
    pixels are finite.
    """
    if pixels.dtype.kind not in "fc" or pixels.size == 0:
        return pixels, ()
    if pixels.dtype.kind == "f" and np.isfinite(pixels.min()) and np.isfinite(pixels.max()):
        return pixels, ()
    bad = ~np.isfinite(pixels)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return pixels, ()
    if n == pixels.size:
        raise UnreadableFile(QuarantineReason.non_finite_pixels, f"all {n} pixels are NaN or infinite")
    good = pixels[~bad]
    fill = good[np.argmin(good.real)] if pixels.dtype.kind == "c" else good.min()
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    pixels[bad] = fill
    return pixels, (f"{n} non-finite pixels set to the image minimum",)


def finite_image(image: DecodedImage) -> DecodedImage:
    """Apply :func:`finite_pixels` to ``image`` in place (pixels and notes) and return it."""
    image.pixels, notes = finite_pixels(image.pixels)
    image.notes = tuple(image.notes) + notes
    return image


# ---------------------------------------------------------------- infrastructure errors

_NETWORK_ERRNOS = frozenset(
    code
    for name in (
        "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH", "EHOSTDOWN", "ENETUNREACH",
        "ENETDOWN", "ENETRESET", "EPIPE", "ENOTCONN", "ESHUTDOWN", "EIO", "EREMOTEIO", "ESTALE", "ENOLINK",
        "ECOMM", "EPROTO", "EACCES", "EPERM", "EMFILE", "ENFILE", "ENOSPC", "EDQUOT", "ENOBUFS",
    )
    if (code := getattr(errno, name, None)) is not None
)
# Class names (anywhere in the MRO) of storage, network and cluster failures in botocore/aiobotocore, s3fs,
# aiohttp, fsspec, requests/urllib3 and distributed; matched by name so none of them has to be importable.
_INFRA_CLASS_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoRegionError",
    "TokenRetrievalError", "UnauthorizedSSOTokenError", "SSOTokenLoadError", "EndpointConnectionError",
    "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ProxyConnectionError",
    "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientOSError", "ClientPayloadError", "FSTimeoutError", "NewConnectionError", "MaxRetryError",
    "ConnectTimeout", "ReadTimeout", "CommClosedError", "KilledWorker",
})
_STATUS_CLASS_NAMES = frozenset({"ClientError", "ClientResponseError", "HttpError", "HTTPError"})
_AUTH_OR_SERVER_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "ExpiredTokenException", "InvalidToken", "TokenRefreshRequired", "RequestExpired", "RequestTimeTooSkewed",
    "AccountProblem", "AllAccessDisabled", "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure",
    "MissingAuthenticationToken", "Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
    "RequestTimeoutException", "ServiceUnavailable", "InternalError",
})


def _auth_or_server_status(status: object) -> bool:
    try:
        code = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return code in (401, 403, 407, 408, 429) or 500 <= code <= 599


def _status_error(exc: BaseException) -> bool:
    """botocore ClientError with an auth/throttling/5xx code; aiohttp/gcsfs/requests HTTP errors with such a status."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        code = str(error.get("Code", "")) if isinstance(error, dict) else ""
        if code in _AUTH_OR_SERVER_CODES or _auth_or_server_status(code):
            return True
        if isinstance(meta, dict) and _auth_or_server_status(meta.get("HTTPStatusCode")):
            return True
    return any(_auth_or_server_status(getattr(exc, attr, None)) for attr in ("status", "code", "status_code"))


def _infrastructure_itself(exc: BaseException) -> bool:
    if isinstance(exc, InfrastructureError | ConnectionError | TimeoutError | PermissionError):
        return True
    if isinstance(exc, socket.gaierror | socket.herror | ssl.SSLError):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        if exc.errno in _NETWORK_ERRNOS:
            return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _INFRA_CLASS_NAMES:
        return True
    return bool(names & _STATUS_CLASS_NAMES) and _status_error(exc)


def _infrastructure_cause(exc: BaseException) -> BaseException | None:
    """The storage/network/cluster failure in ``exc`` or its cause/context chain, else None.

    The walk stops at :class:`UnreadableFile` (a reader already judged the file).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and not isinstance(current, UnreadableFile):
        if _infrastructure_itself(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when ``exc`` means storage/network/cluster trouble rather than a bad input file.

    True for ``ConnectionError``, ``TimeoutError``, ``PermissionError``, socket/SSL errors, ``OSError`` with a
    network/IO errno (never ``FileNotFoundError``/``IsADirectoryError``/``NotADirectoryError``),
    :class:`medpipe.errors.InfrastructureError`, and by class name botocore/aiobotocore/s3fs/aiohttp/fsspec/
    distributed failures (NoCredentialsError, EndpointConnectionError, ClientError with auth/throttling/5xx
    codes, ClientConnectorError, CommClosedError, KilledWorker, ...), also when found in the
    ``__cause__``/``__context__`` chain. ``UnreadableFile`` is never one.
    """
    return _infrastructure_cause(exc) is not None


def raise_if_infrastructure(exc: BaseException) -> None:
    """Re-raise ``exc`` as :class:`InfrastructureError` when it is one (see :func:`is_infrastructure_error`).

    The message names the exception class only: never a path or the original text, which may hold one.
    Every catch-all in the readers calls this first, so unreachable storage is never quarantined.
    """
    if isinstance(exc, InfrastructureError):
        raise exc
    cause = _infrastructure_cause(exc)
    if cause is not None:
        raise InfrastructureError(f"{type(cause).__name__} reading a source file") from None


def infrastructure_guard(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate a public reader: storage/network failures escaping it become :class:`InfrastructureError`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (UnreadableFile, InfrastructureError):
            raise
        except Exception as exc:
            raise_if_infrastructure(exc)
            raise

    return wrapper
