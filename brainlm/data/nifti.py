"""NIfTI headers: the facts parcellation needs (`NiftiInfo`), checked, and read errors in words.

`read_nifti_info(path)` loads the header with nibabel as `nibabel.load` does. Given an open
`SourceFile`, it parses the same header from the first bytes of the stream the data will be
read from (nibabel's own image classes and checks on those bytes, so the facts are the ones
`nibabel.load` gives); anything unusual there (a file too short to sniff, a NIfTI-2 that is
CIFTI, extensions without a data offset, an unreadable start) goes through `nibabel.load` of
the path instead, so refusals read exactly as they always did.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

_SNIFF = 1024  # bytes nibabel.load sniffs to choose the image class


@dataclass
class NiftiInfo:
    path: Path
    shape: tuple
    affine: np.ndarray
    dtype: np.dtype
    slope: float
    inter: float
    offset: int
    tr: float | None
    compressed: bool
    header_tr: float | None = None
    notes: list = field(default_factory=list)
    image_class: type | None = None  # nibabel's class for it (Nifti1Image or Nifti2Image)


def read_nifti_info(path, tr_override: float | None = None, source=None) -> NiftiInfo:
    """Header facts, checked: 4-D, mappable to MNI, with a usable TR.

    `source`: the recording's open `SourceFile`; the header is then parsed from its first
    bytes (which it keeps for the data reader) instead of opening the file again."""
    import nibabel as nib

    path = Path(path)
    img = _image_from_stream(source, path) if source is not None else None
    if img is None:
        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise InputError(path, f"unreadable NIfTI ({describe_error(exc)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI-1/2 image ({type(img).__name__})")
    return _checked_info(img, path, tr_override)


def _checked_info(img, path: Path, tr_override: float | None) -> NiftiInfo:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 5 and shape[3] == 1:
        raise InputError(path, f"5-D image {shape}: expected x, y, z, time")
    if len(shape) != 4:
        raise InputError(path, f"{len(shape)}-D image {shape}: a 4-D time series is needed")
    if shape[3] < 2:
        raise InputError(path, f"one volume {shape}: a 4-D time series is needed")
    hdr = img.header
    _check_size(path, shape, int(np.dtype(hdr.get_data_dtype()).itemsize))
    affine = np.asarray(img.affine, dtype=np.float64)
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        raise InputError(path, "no sform/qform (both codes 0): the voxel grid cannot be "
                               "mapped to MNI space")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError(path, "singular or non-finite affine: the voxel grid cannot be "
                               "mapped to MNI space")
    # nibabel moves the scale factors from the header to the array proxy on load
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    header_tr = _header_tr(hdr)
    tr = tr_override if tr_override is not None else header_tr
    notes = []
    codes = {int(hdr["sform_code"]), int(hdr["qform_code"])} - {0}
    if codes <= {1}:  # ANTs writes 1 for MNI-registered data too: warn, do not refuse
        notes.append("header says scanner space (sform/qform code 1): assuming the data are "
                     "registered to MNI152")
    return NiftiInfo(path=path, shape=shape, affine=affine, dtype=hdr.get_data_dtype(),
                     slope=slope, inter=inter, offset=int(img.dataobj.offset), tr=tr,
                     compressed=path.name.endswith(".gz"), header_tr=header_tr, notes=notes,
                     image_class=type(img))


GZIP_MAX_RATIO = 1100  # deflate cannot expand a byte into more than ~1,032


def size_limits() -> tuple[int, int]:
    """(most volumes, most bytes of image data) from BRAINLM_MAX_VOLUMES and
    BRAINLM_MAX_NIFTI_GB (defaults 100,000 volumes and 64 GB: hours of scanning at sub-second
    TRs, and A424's 2 mm grid for 20,000 float32 volumes)."""
    import os

    def number(name: str, default: float) -> float:
        raw = os.environ.get(name)
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise InputError(Path(name), f"{raw!r} is not a number") from None
        return value if value > 0 else default

    return (int(number("BRAINLM_MAX_VOLUMES", 100_000)),
            int(number("BRAINLM_MAX_NIFTI_GB", 64) * 2**30))


def _check_size(path: Path, shape: tuple, itemsize: int) -> None:
    """Refuse, from the header alone, an image beyond the bounds or beyond what the file can
    hold: a 100 kB .nii.gz can declare a million volumes, which would be decompressed and
    allocated for minutes before anything failed."""
    volumes, most_bytes = size_limits()
    data = int(np.prod(shape, dtype=np.float64)) * itemsize
    if shape[3] > volumes:
        raise InputError(path, f"{shape[3]:,} volumes declared, more than the bound of "
                               f"{volumes:,} (set BRAINLM_MAX_VOLUMES to allow more)")
    if data > most_bytes:
        raise InputError(path, f"{data / 2**30:.1f} GB of image data declared, more than the "
                               f"bound of {most_bytes / 2**30:g} GB (BRAINLM_MAX_NIFTI_GB)")
    try:
        on_disk = path.stat().st_size
    except OSError:
        return
    gz = path.name.endswith(".gz")
    if on_disk and data > on_disk * (GZIP_MAX_RATIO if gz else 1):
        raise InputError(path, f"the header declares {data:,} bytes of image data, more than "
                               f"a {'gzip ' if gz else ''}file of {on_disk:,} bytes can hold "
                               "(truncated, or a decompression bomb)")


def _image_from_stream(source, path: Path):
    """The image nibabel.load(path) would give, from the stream's first bytes; None when the
    start is not a plain single-file NIfTI-1/2 (nibabel.load then decides, from the path)."""
    import nibabel as nib
    from nibabel.imageclasses import all_image_classes

    try:
        head = source.peek(_SNIFF)
    except Exception:  # damaged gzip: let nibabel.load say it in its words
        return None
    if len(head) < _SNIFF:  # nibabel would sniff these again from the file
        return None
    name, sniff = str(path), (head, str(path))
    for klass in all_image_classes:  # nibabel.load's choice, on the sniffed bytes
        found, sniff = klass.path_maybe_image(name, sniff)
        if found:
            break
    else:
        return None
    if klass not in (nib.Nifti1Image, nib.Nifti2Image):
        return None
    size = klass.header_class.sizeof_hdr
    try:
        header = klass.header_class.from_fileobj(io.BytesIO(head[:size]), check=False)
        offset = int(header["vox_offset"])
        if offset < size + 4:  # extensions would be read to the end of the file
            return None
        return klass.from_stream(io.BytesIO(source.peek(max(offset, _SNIFF))))
    except Exception:
        return None


def _header_tr(hdr) -> float | None:
    zooms = hdr.get_zooms()
    tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    unit = hdr.get_xyzt_units()[1]
    tr *= {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return tr if math.isfinite(tr) and tr > 0 else None


def describe_error(exc: BaseException) -> str:
    """A read error in words: truncated or corrupt gzip named as such."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, EOFError) or "compressed file ended" in text.lower():
        return "truncated file: gzip stream ended early"
    if "gzip" in name.lower() or "zlib" in name.lower() or "invalid" in text.lower():
        return f"corrupt gzip data: {text or name}"
    return f"{name}: {text}" if text else name
