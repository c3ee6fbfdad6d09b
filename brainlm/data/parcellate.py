"""From one recording to a cleaned [parcels, time] array at the target TR.

Two engines give the same numbers:
- `nilearn`: `NiftiLabelsMasker(resampling_target="labels")`, the reference. It loads the whole
  4-D image and resamples every volume to the atlas grid before averaging.
- `fast` (default): the same "resample the data to the atlas, then average each label" written
  as one sparse [parcels, source voxels] operator (trilinear weights), applied to volumes as they
  are decompressed (ISA-L, in a background thread). Memory stays at a few volumes and the run
  costs little more than reading the file; see benchmarks/parcellate.py.
Both then share nilearn's signal cleaning and our TR resampling.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, check_orientation
from ..fileio import sha256_file

CACHE_VERSION = "1"


@dataclass(frozen=True)
class ParcellationSettings:
    target_tr: float = 0.735
    engine: str = "fast"  # "fast" or "nilearn"
    detrend: bool = True
    standardize: str = "psc"  # "psc" (percent signal change), "zscore", or "none"
    high_pass: float | None = None  # Hz
    low_pass: float | None = None  # Hz
    confounds: tuple[str, ...] = ()  # columns of fMRIPrep's confounds table to regress out
    min_timepoints: int = 200  # after TR resampling; one model window
    max_uncovered: float = 0.5  # quarantine when more parcels than this lack signal

    def key(self) -> dict:
        """Settings that change the parcellated array (not the thresholds)."""
        d = asdict(self)
        d.pop("min_timepoints")
        d.pop("max_uncovered")
        return d


@dataclass
class Parcellated:
    signals: np.ndarray  # float32 [P, T] at the target TR, cleaned, not yet scaled
    coverage: np.ndarray  # bool [P]: False where no voxel of the parcel had signal
    tr_source: float
    n_timepoints_source: int
    source_hash: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- NIfTI header


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


def read_nifti_info(path, tr_override: float | None = None) -> NiftiInfo:
    """Header facts, checked: 4-D, mappable to MNI, with a usable TR."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"unreadable NIfTI ({_describe(exc)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI-1/2 image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 5 and shape[3] == 1:
        raise InputError(path, f"5-D image {shape}: expected x, y, z, time")
    if len(shape) != 4:
        raise InputError(path, f"{len(shape)}-D image {shape}: a 4-D time series is needed")
    if shape[3] < 2:
        raise InputError(path, f"one volume {shape}: a 4-D time series is needed")
    hdr = img.header
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
                     compressed=path.name.endswith(".gz"), header_tr=header_tr, notes=notes)


def _header_tr(hdr) -> float | None:
    zooms = hdr.get_zooms()
    tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    unit = hdr.get_xyzt_units()[1]
    tr *= {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return tr if math.isfinite(tr) and tr > 0 else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, EOFError) or "compressed file ended" in text.lower():
        return "truncated file: gzip stream ended early"
    if "gzip" in name.lower() or "zlib" in name.lower() or "invalid" in text.lower():
        return f"corrupt gzip data: {text or name}"
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------- fast engine


class LabelOperator:
    """Sparse [P, V_source] map: parcel means of the data trilinearly resampled to the atlas.

    Rows of `weights` sum to 1 over source voxels; `support` is each parcel's number of atlas
    voxels inside the source field of view.
    """

    def __init__(self, atlas, shape3: tuple, affine: np.ndarray):
        import scipy.sparse as sp

        labels = atlas.labels
        ijk = np.stack(np.nonzero(labels > 0), axis=1)
        parcel = np.searchsorted(atlas.label_values, labels[tuple(ijk.T)])
        to_src = np.linalg.inv(affine) @ atlas.affine
        pos = ijk @ to_src[:3, :3].T + to_src[:3, 3]
        near = np.round(pos)
        pos = np.where(np.abs(pos - near) < 1e-4, near, pos)  # same grid -> exact voxel hits
        base = np.floor(pos).astype(np.int64)
        frac = pos - base
        dims = np.array(shape3)
        rows, cols, vals = [], [], []
        inside = np.ones(len(ijk), dtype=bool)
        corners = []
        for corner in np.ndindex(2, 2, 2):
            c = np.array(corner)
            w = np.prod(np.where(c == 1, frac, 1.0 - frac), axis=1)
            idx = base + c
            ok = np.all((idx >= 0) & (idx < dims), axis=1)
            inside &= ok | (w == 0)
            corners.append((idx, w))
        for idx, w in corners:
            use = inside & (w > 0)
            flat = idx[use, 0] + dims[0] * (idx[use, 1] + dims[1] * idx[use, 2])  # F order
            rows.append(parcel[use])
            cols.append(flat)
            vals.append(w[use])
        n_vox = int(np.prod(dims))
        raw = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(atlas.n_parcels, n_vox))
        raw.sum_duplicates()
        self.support = np.bincount(parcel[inside], minlength=atlas.n_parcels)
        self.raw = raw
        self.n_voxels = n_vox

    def masked(self, valid: np.ndarray | None):
        """Operator restricted to valid source voxels (e.g. inside the data's brain mask),
        rows renormalised; also the boolean coverage per parcel."""
        import scipy.sparse as sp

        op = self.raw
        if valid is not None:
            op = op @ sp.diags(valid.astype(np.float64))
        total = np.asarray(op.sum(axis=1)).ravel()
        covered = total > 1e-12
        scale = np.where(covered, 1.0 / np.where(covered, total, 1.0), 0.0)
        op = (sp.diags(scale) @ op).tocsr()
        used = np.unique(op.indices)
        compact = op[:, used].T.tocsr()  # [U, P], float64: sums of ~1e3 voxels of ~1e4
        return compact, used, covered


_OPERATORS: dict = {}


def _operator(atlas, shape3, affine) -> LabelOperator:
    key = (atlas.hash, tuple(shape3), np.asarray(affine, np.float64).round(6).tobytes())
    if key not in _OPERATORS:
        if len(_OPERATORS) > 8:
            _OPERATORS.clear()
        _OPERATORS[key] = LabelOperator(atlas, shape3, affine)
    return _OPERATORS[key]


def _open_stream(info: NiftiInfo):
    if info.compressed:
        from isal import igzip_threaded

        return igzip_threaded.open(info.path, "rb", threads=1)
    return open(info.path, "rb")


def _fill(f, view: memoryview, info: NiftiInfo) -> None:
    """Read exactly len(view) bytes into a preallocated buffer (no per-chunk allocation)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise InputError(info.path, "truncated file: data end before the last volume")
        got += n


def extract_fast(info: NiftiInfo, atlas, chunk: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Stream volumes through the label operator. Returns ([P, T] float32, coverage [P])."""
    op = _operator(atlas, info.shape[:3], info.affine)
    n_vox, n_t = op.n_voxels, info.shape[3]
    out = np.empty((n_t, atlas.n_parcels), dtype=np.float32)
    buf = np.empty((chunk, n_vox), dtype=info.dtype)
    view = memoryview(buf).cast("B")
    compact = used = covered = None
    try:
        with _open_stream(info) as f:
            _fill(f, memoryview(bytearray(info.offset)), info)
            for t0 in range(0, n_t, chunk):
                n = min(chunk, n_t - t0)
                _fill(f, view[: n * n_vox * buf.itemsize], info)
                frames = buf[:n]
                if compact is None:  # zero or NaN in the first volume = outside the data's mask
                    first = frames[0].astype(np.float64) * info.slope + info.inter
                    valid = np.isfinite(first) & (first != 0)
                    compact, used, covered = op.masked(valid)
                    if not covered.any():
                        raise InputError(info.path, _no_overlap_message(info, atlas, op, valid))
                out[t0:t0 + n] = frames[:, used].astype(np.float64) @ compact
    except InputError:
        raise
    except Exception as exc:  # zlib/gzip/EOF errors from a damaged file
        raise InputError(info.path, _describe(exc)) from None
    signals = out.T * np.float32(info.slope) + np.float32(info.inter)
    signals[~covered] = 0.0
    return np.ascontiguousarray(signals), covered


def _no_overlap_message(info: NiftiInfo, atlas, op: LabelOperator, valid: np.ndarray) -> str:
    if not valid.any():
        return "the first volume is all zeros: no signal to parcellate"
    centre = info.affine @ np.r_[(np.array(info.shape[:3]) - 1) / 2.0, 1.0]
    where = f"its centre maps to {np.round(centre[:3]).astype(int).tolist()} mm"
    if op.raw.nnz == 0:
        return f"field of view does not overlap the atlas: not in MNI space? ({where})"
    return f"no voxel with signal falls inside an atlas parcel: not in MNI space? ({where})"


# --------------------------------------------------------------------------- nilearn engine


def extract_nilearn(info: NiftiInfo, atlas) -> tuple[np.ndarray, np.ndarray]:
    """Reference path: NiftiLabelsMasker with the data resampled to the atlas grid."""
    import warnings

    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker

    try:
        img = nib.load(str(info.path))
        data = img.get_fdata(dtype=np.float32)  # surface read errors here, with the file's name
    except Exception as exc:
        raise InputError(info.path, _describe(exc)) from None
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:  # nilearn would silently turn them into zeros
        raise InputError(info.path, f"NaN/Inf voxel values ({bad}); the nilearn engine does not "
                                    "mask them (the fast engine treats NaN in the first volume "
                                    "as outside the brain)")
    del data
    masker = NiftiLabelsMasker(labels_img=atlas.to_nifti(), resampling_target="labels",
                               strategy="mean", standardize=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        series = masker.fit_transform(img)  # [T, P']
    values = [v for k, v in masker.region_ids_.items() if k != "background"]  # column order
    signals = np.zeros((atlas.n_parcels, series.shape[0]), dtype=np.float32)
    index = np.searchsorted(atlas.label_values, np.asarray(values, dtype=np.int64))
    signals[index] = series.T
    covered = signals.std(axis=1) > 0
    signals[~covered] = 0.0
    return signals, covered


# --------------------------------------------------------------------------- tables


def read_timeseries_table(path, n_parcels: int) -> tuple[np.ndarray, np.ndarray]:
    """An already-parcellated time x parcels table (TSV/CSV/NPY) -> ([P, T], coverage).

    Whole-NaN columns are parcels without coverage (XCP-D writes them so); scattered NaNs are
    an error.
    """
    import pandas as pd

    path = Path(path)
    try:
        if path.name.endswith(".npy"):
            table = np.load(path, allow_pickle=False)
        else:
            sep = "\t" if path.name.endswith(".tsv") else ","
            raw = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
            table = _numeric_table(raw, path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable time-series table ({_describe(exc)})") from None
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2:
        raise InputError(path, f"expected a 2-D time x parcels table, got shape {table.shape}")
    if table.shape[1] != n_parcels:
        if table.shape[0] == n_parcels:
            raise InputError(path, f"shape {table.shape} looks like parcels x time; expected "
                                   f"time x parcels ({n_parcels} columns)")
        raise InputError(path, f"{table.shape[1]} columns but the coordinates list "
                               f"{n_parcels} parcels")
    bad = ~np.isfinite(table)
    empty = bad.all(axis=0)
    scattered = bad[:, ~empty].sum()
    if scattered:
        raise InputError(path, f"{int(scattered)} NaN/Inf values inside "
                               f"{int(bad[:, ~empty].any(axis=0).sum())} parcel columns")
    signals = np.where(bad, 0.0, table).T.astype(np.float32)
    return signals, ~empty & (signals.std(axis=1) > 0)


_MISSING = {"", "n/a", "na", "nan", "NaN", "NA", "N/A"}


def _numeric_table(raw, path: Path) -> np.ndarray:
    """Text cells -> float [rows, cols]. The first row is a header when it holds any
    non-number, or when it is exactly 0..C-1 or 1..C (column labels written as numbers)."""
    import pandas as pd

    first = pd.to_numeric(raw.iloc[0], errors="coerce")
    n_cols = raw.shape[1]
    labels = first.to_numpy()
    is_header = (first.isna().any() and not raw.iloc[0].isin(_MISSING).all()) or \
        np.array_equal(labels, np.arange(n_cols)) or np.array_equal(labels, np.arange(1, n_cols + 1))
    body = raw.iloc[1:] if is_header else raw
    missing = body.isin(_MISSING)
    values = body.apply(pd.to_numeric, errors="coerce")
    text = values.isna() & ~missing
    if text.to_numpy().any():
        r, c = np.argwhere(text.to_numpy())[0]
        raise InputError(path, f"non-numeric value {body.iat[r, c]!r} in row {r + 1 + is_header}, "
                               f"column {c + 1} ({int(text.to_numpy().sum())} such cells)")
    return values.to_numpy(np.float64)


# --------------------------------------------------------------------------- cleaning, TR


def expected_length(n: int, tr_source: float, tr_target: float) -> int:
    if abs(tr_source - tr_target) < 1e-6:
        return n
    return int(math.floor((n - 1) * tr_source / tr_target + 1e-9)) + 1


def resample_tr(signals: np.ndarray, tr_source: float, tr_target: float) -> np.ndarray:
    """[P, T] at tr_source -> [P, T'] at tr_target on the same time span.

    Cubic-spline interpolation; when going to a longer TR the series is first low-passed below
    the new Nyquist frequency so fast fluctuations do not alias.
    """
    from scipy.interpolate import make_interp_spline
    from scipy.signal import butter, sosfiltfilt

    if abs(tr_source - tr_target) < 1e-6:
        return signals.astype(np.float32, copy=False)
    n = signals.shape[1]
    x = signals.astype(np.float64)
    if tr_target > tr_source and n > 15:
        nyquist_new = 0.5 / tr_target
        sos = butter(5, 0.9 * nyquist_new, fs=1.0 / tr_source, output="sos")
        x = sosfiltfilt(sos, x, axis=1)
    t_src = np.arange(n) * tr_source
    t_new = np.arange(expected_length(n, tr_source, tr_target)) * tr_target
    spline = make_interp_spline(t_src, x, k=3 if n > 3 else 1, axis=1)
    return spline(t_new).astype(np.float32)


def clean(signals: np.ndarray, coverage: np.ndarray, tr: float, settings: ParcellationSettings,
          confounds: np.ndarray | None = None) -> np.ndarray:
    """nilearn's signal cleaning on covered parcels; uncovered stay 0."""
    from nilearn.signal import clean as nl_clean

    out = np.zeros_like(signals, dtype=np.float32)
    if not coverage.any():
        return out
    nyquist = 0.5 / tr
    for name, f in (("high_pass", settings.high_pass), ("low_pass", settings.low_pass)):
        if f is not None and f >= nyquist:
            raise ValueError(f"{name} {f:g} Hz is not below the Nyquist frequency {nyquist:.3f} Hz "
                             f"of this recording's TR ({tr:g} s)")
    standardize = {"psc": "psc", "zscore": "zscore_sample", "none": None}[settings.standardize]
    x = signals[coverage].T.astype(np.float64)  # nilearn wants [time, features]
    if not (settings.detrend or standardize or settings.high_pass or settings.low_pass
            or confounds is not None):
        return signals.astype(np.float32)
    if standardize == "psc" and np.any(np.abs(x.mean(axis=0)) < 1e-6):
        raise ValueError("percent signal change needs a non-zero baseline; the data look "
                         "already centred (use standardize='zscore' or 'none')")
    y = nl_clean(x, detrend=settings.detrend, standardize=standardize, confounds=confounds,
                 high_pass=settings.high_pass, low_pass=settings.low_pass, t_r=tr,
                 standardize_confounds=True)
    out[coverage] = y.T
    return out


def _load_confounds(path: Path | None, columns: tuple[str, ...], source: Path, n_t: int):
    import pandas as pd

    if not columns:
        return None
    if path is None:
        raise InputError(source, "confound regression asked for, but no "
                                 "*_desc-confounds_timeseries.tsv beside it")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except Exception as exc:
        raise InputError(source, f"unreadable confounds table {path.name} ({exc})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(source, f"confounds table {path.name} lacks columns: "
                                 f"{', '.join(missing)}")
    if len(table) != n_t:
        raise InputError(source, f"confounds table {path.name} has {len(table)} rows for "
                                 f"{n_t} volumes")
    return table[list(columns)].fillna(0.0).to_numpy(np.float64)


# --------------------------------------------------------------------------- one recording


def parcellate_recording(recording, atlas, settings: ParcellationSettings,
                         cache_dir: Path | None = None) -> Parcellated:
    """Parcellate, clean and resample one recording; cached by input hash and settings.

    Raises InputError with the file and the problem for anything that cannot be used.
    """
    path = Path(recording.path)
    try:
        source_hash = sha256_file(path)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    key_src = {"source": source_hash, "atlas": atlas.hash, "settings": settings.key(),
               "tr": recording.tr, "version": CACHE_VERSION, "kind": recording.kind,
               "confounds": sha256_file(recording.confounds) if recording.confounds and
               settings.confounds else None}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    result = _cache_read(cache_dir, key) if cache_dir is not None else None
    if result is None:
        result = _compute(recording, atlas, settings, source_hash)
        if cache_dir is not None:
            _cache_write(cache_dir, key, result)
    # thresholds are checked on cached results too: they are not part of the cache key
    check_orientation(result.signals, atlas.n_parcels, f"{path} after TR resampling")
    n_out = result.signals.shape[1]
    if n_out < settings.min_timepoints:
        raise InputError(path, f"too few timepoints: {result.n_timepoints_source} at TR "
                               f"{result.tr_source:g} s gives {n_out} at {settings.target_tr:g} s, "
                               f"fewer than one window of {settings.min_timepoints}")
    uncovered = int((~result.coverage).sum())
    if uncovered > settings.max_uncovered * atlas.n_parcels:
        raise InputError(path, f"{uncovered} of {atlas.n_parcels} parcels have no signal "
                               "(field of view too small, or not in MNI space?)")
    return result


def _compute(recording, atlas, settings: ParcellationSettings, source_hash: str) -> Parcellated:
    path = Path(recording.path)
    notes: list[str] = []
    if recording.kind == "nifti":
        info = read_nifti_info(path, recording.tr)
        n_t = info.shape[3]
        tr = info.tr
        notes += info.notes
        if (getattr(recording, "tr_origin", "") == "sidecar" and info.header_tr
                and abs(info.header_tr - tr) > 0.01 * tr):
            notes.append(f"sidecar TR {tr:g} s differs from header TR {info.header_tr:g} s; "
                         "using the sidecar")
    else:
        info, tr = None, recording.tr
        signals, coverage = read_timeseries_table(path, atlas.n_parcels)
        n_t = signals.shape[1]
    if tr is None:
        raise InputError(path, "missing TR (none in the header or a JSON sidecar); pass "
                               "--input-tr or add RepetitionTime to the sidecar")
    if tr > 30:
        raise InputError(path, f"TR of {tr:g} s is implausible (milliseconds written as "
                               "seconds?); pass --input-tr")
    n_out = expected_length(n_t, tr, settings.target_tr)
    if n_out < settings.min_timepoints:  # before the expensive read
        raise InputError(path, f"too few timepoints: {n_t} at TR {tr:g} s gives {n_out} at "
                               f"{settings.target_tr:g} s, fewer than one window of "
                               f"{settings.min_timepoints}")
    confounds = _load_confounds(recording.confounds, settings.confounds, path, n_t)
    if info is not None:
        extract = extract_nilearn if settings.engine == "nilearn" else extract_fast
        signals, coverage = extract(info, atlas)
    if not np.all(np.isfinite(signals)):
        bad = ~np.all(np.isfinite(signals), axis=1)
        raise InputError(path, f"NaN/Inf voxel values inside {int(bad.sum())} parcels")
    check_orientation(signals, atlas.n_parcels, f"{path} after parcellation", min_time=n_t)
    try:
        cleaned = clean(signals, coverage, tr, settings, confounds)
    except ValueError as exc:
        raise InputError(path, f"signal cleaning failed: {exc}") from None
    result = Parcellated(signals=resample_tr(cleaned, tr, settings.target_tr), coverage=coverage,
                         tr_source=float(tr), n_timepoints_source=int(n_t),
                         source_hash=source_hash, notes=notes)
    return result


def _cache_read(cache_dir: Path, key: str) -> Parcellated | None:
    base = Path(cache_dir) / key[:2] / key
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        signals = np.load(base.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None
    return Parcellated(signals=signals, coverage=np.array(meta["coverage"], dtype=bool),
                       tr_source=meta["tr_source"], n_timepoints_source=meta["n_timepoints_source"],
                       source_hash=meta["source_hash"], notes=meta["notes"])


def _cache_write(cache_dir: Path, key: str, result: Parcellated) -> None:
    from ..fileio import atomic_path, write_bytes_atomic

    base = Path(cache_dir) / key[:2] / key
    with atomic_path(base.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, result.signals)
    meta = {"coverage": result.coverage.tolist(), "tr_source": result.tr_source,
            "n_timepoints_source": result.n_timepoints_source,
            "source_hash": result.source_hash, "notes": result.notes}
    write_bytes_atomic(base.with_suffix(".json"), json.dumps(meta).encode())
