"""From one recording to a cleaned [parcels, time] array at the target TR, cached.

A NIfTI goes through one of two engines that give the same numbers (`brainlm.data.extract`:
the streaming `fast` one, the default, and the `nilearn` reference), then nilearn's signal
cleaning and our TR resampling (`brainlm.data.cleaning`); an already-parcellated table
(`brainlm.data.tables`) skips the engines.

Each input file is read once. Its header is parsed from the first bytes of the stream the
volumes are then read from, and its sha256 is computed from the same raw bytes as they are
read (`brainlm.data.source.SourceFile`). The cache is keyed on that content hash, known only
after the read, so before reading a recording is predicted cached or not from the hash last
computed for its path (kept beside the cache with the file's size, mtime and inode): a
predicted hit is read only to hash it, and the cache entry is used if the hash matches; a
predicted miss is parcellated while it is hashed, and should its entry exist after all, the
entry is returned, as a run that hashed first would have. A caller that has just hashed the
file (a Prefect task's cache key) passes `source_hash` and a hit reads nothing.

The submodules' names stay importable from here (`read_nifti_info`, `extract_fast`, `clean`...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputError, check_orientation
from ..fileio import read_json
from .cleaning import clean, expected_length, resample_tr
from .extract import LabelOperator, extract_fast, extract_nilearn
from .nifti import NiftiInfo, read_nifti_info
from .source import SourceFile, hash_file, remember_hash, remembered_hash
from .tables import read_confounds, read_timeseries_table

__all__ = ["CACHE_VERSION", "LabelOperator", "NiftiInfo", "Parcellated", "ParcellationSettings",
           "check_parcellated", "clean", "expected_length", "extract_fast", "extract_nilearn",
           "parcellate_recording", "read_cached", "read_nifti_info", "read_timeseries_table",
           "resample_tr"]

CACHE_VERSION = "1"


ENGINES = ("fast", "nilearn")
STANDARDIZE = ("psc", "zscore", "none")


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
    cache_key: str | None = None  # its entry in the cache, once read from or written to it


class _Read(NamedTuple):
    """A recording's parcel series as read, before cleaning."""

    signals: np.ndarray
    coverage: np.ndarray
    tr: float
    n_timepoints: int
    notes: list
    confounds: np.ndarray | None


# --------------------------------------------------------------------------- one recording


def parcellate_recording(recording, atlas, settings: ParcellationSettings,
                         cache_dir: Path | None = None,
                         source_hash: str | None = None) -> Parcellated:
    """Parcellate, clean and resample one recording; cached by input hash and settings.

    `source_hash`: the file's sha256 when the caller has just computed it; trusted for the
    cache lookup, so a cached recording is not read again. Raises InputError with the file and
    the problem for anything that cannot be used.
    """
    path = Path(recording.path)
    cache = _Cache(cache_dir, recording, atlas, settings)
    result = _from_cache(cache, path, source_hash)
    if result is None:
        result = _compute(recording, atlas, settings, cache)
        cache.put(result)
    check_parcellated(result, path, atlas, settings)
    return result


def check_parcellated(result: Parcellated, path, atlas, settings: ParcellationSettings) -> None:
    """The thresholds, checked on cached results too: they are not part of the cache key."""
    check_orientation(result.signals, atlas.n_parcels, f"{path} after TR resampling")
    n_out = result.signals.shape[1]
    if n_out < settings.min_timepoints:
        raise InputError(path, f"too few timepoints: {result.n_timepoints_source} at TR "
                               f"{result.tr_source:g} s gives {n_out} at {settings.target_tr:g} s, "
                               f"fewer than one window of {settings.min_timepoints}")
    flat = result.coverage & ~(result.signals.std(axis=1) > 0)  # covered, constant in time
    uncovered = int((~result.coverage).sum() + flat.sum())
    if uncovered > settings.max_uncovered * atlas.n_parcels:
        why = "(field of view too small, or not in MNI space?)" if not flat.any() else \
            f"({int(flat.sum())} constant in time: every volume the same?)"
        raise InputError(path, f"{uncovered} of {atlas.n_parcels} parcels have no signal {why}")
    if flat.any():  # zero or constant in this recording: no signal, whatever its voxels held
        result.coverage = result.coverage & ~flat
        result.notes = [*result.notes, f"{int(flat.sum())} parcels constant in time (zero?): "
                        "counted as not covered"]


def _cannot_read(path: Path, exc: OSError) -> InputError:
    return InputError(path, f"cannot read ({exc.strerror or exc})")


def _from_cache(cache: _Cache, path: Path, known: str | None) -> Parcellated | None:
    """The cached result if the file's content is cached, reading the file only to hash it
    (not at all when the hash is `known`); None when it is to be computed."""
    expected = known or cache.predicted(path)
    if expected is None:
        return None
    entry = cache.get(expected)
    if entry is None or known:
        return entry
    try:
        actual, st = hash_file(path)
    except OSError as exc:
        raise _cannot_read(path, exc) from None
    cache.remember(path, st, actual)
    return entry if actual == expected else cache.get(actual)


def _compute(recording, atlas, settings: ParcellationSettings, cache: _Cache) -> Parcellated:
    """Read the recording once, hashing it as it streams, and parcellate it; the cache entry
    instead when its content turns out to be cached after all (also when the read failed: a
    run that hashed first would never have parsed it)."""
    path = Path(recording.path)
    try:
        source = SourceFile(path)
    except OSError as exc:
        raise _cannot_read(path, exc) from None
    with source:
        confounds = cache.confounds_data()  # read after the input, as its hash always was
        try:
            if recording.kind == "nifti":
                read, content = _read_image(recording, atlas, settings, source, confounds), None
            else:
                read, content = None, source.read_all()
        except Exception:
            cached = _cached_after_all(cache, source)
            if cached is None:
                raise
            return cached
        try:
            source_hash = source.finish()
        except OSError as exc:
            raise _cannot_read(path, exc) from None
    cache.remember(path, source.stat, source_hash)
    cached = cache.get(source_hash)
    if cached is not None:
        return cached
    if read is None:
        read = _read_table(recording, atlas, settings, content, confounds)
    return _finish(path, atlas, settings, read, source_hash)


def _cached_after_all(cache: _Cache, source: SourceFile) -> Parcellated | None:
    """When reading failed: the cache entry of the file's content if there is one (the same
    bytes under another name, say), as a run that hashed the file first would have used."""
    try:
        source_hash = source.finish()
    except Exception:
        return None
    cache.remember(source.path, source.stat, source_hash)
    return cache.get(source_hash)


def _read_image(recording, atlas, settings, source: SourceFile, confounds: bytes | None) -> _Read:
    path = Path(recording.path)
    info = read_nifti_info(path, recording.tr, source=source)
    n_t, tr = info.shape[3], info.tr
    notes = list(info.notes)
    if (getattr(recording, "tr_origin", "") == "sidecar" and info.header_tr
            and abs(info.header_tr - tr) > 0.01 * tr):
        notes.append(f"sidecar TR {tr:g} s differs from header TR {info.header_tr:g} s; "
                     "using the sidecar")
    _check_timing(path, tr, n_t, settings)  # before the expensive read
    regressors = read_confounds(recording.confounds, settings.confounds, path, n_t, confounds)
    extract = extract_nilearn if settings.engine == "nilearn" else extract_fast
    signals, coverage = extract(info, atlas, source=source)
    return _Read(signals, coverage, tr, n_t, notes, regressors)


def _read_table(recording, atlas, settings, content: bytes, confounds: bytes | None) -> _Read:
    path = Path(recording.path)
    signals, coverage = read_timeseries_table(path, atlas.n_parcels, data=content)
    n_t, tr = signals.shape[1], recording.tr
    _check_timing(path, tr, n_t, settings)
    regressors = read_confounds(recording.confounds, settings.confounds, path, n_t, confounds)
    return _Read(signals, coverage, tr, n_t, [], regressors)


def _check_timing(path: Path, tr: float | None, n_t: int, settings) -> None:
    if tr is None:
        raise InputError(path, "missing TR (none in the header or a JSON sidecar); pass "
                               "--input-tr or add RepetitionTime to the sidecar")
    if tr > 30:
        raise InputError(path, f"TR of {tr:g} s is implausible (milliseconds written as "
                               "seconds?); pass --input-tr")
    n_out = expected_length(n_t, tr, settings.target_tr)
    if n_out < settings.min_timepoints:
        raise InputError(path, f"too few timepoints: {n_t} at TR {tr:g} s gives {n_out} at "
                               f"{settings.target_tr:g} s, fewer than one window of "
                               f"{settings.min_timepoints}")


def _finish(path: Path, atlas, settings, read: _Read, source_hash: str) -> Parcellated:
    """Check, clean and resample what was read."""
    signals = read.signals
    if not np.all(np.isfinite(signals)):
        bad = ~np.all(np.isfinite(signals), axis=1)
        raise InputError(path, f"NaN/Inf voxel values inside {int(bad.sum())} parcels")
    check_orientation(signals, atlas.n_parcels, f"{path} after parcellation",
                      min_time=read.n_timepoints)
    try:
        cleaned = clean(signals, read.coverage, read.tr, settings, read.confounds)
    except ValueError as exc:
        raise InputError(path, f"signal cleaning failed: {exc}") from None
    return Parcellated(signals=resample_tr(cleaned, read.tr, settings.target_tr),
                       coverage=read.coverage, tr_source=float(read.tr),
                       n_timepoints_source=int(read.n_timepoints), source_hash=source_hash,
                       notes=read.notes)


# --------------------------------------------------------------------------- the cache


class _Cache:
    """Where one recording's parcellation is kept: the entry is keyed by the input's sha256,
    the atlas, the settings that change the array, the TR, the kind and the confounds table's
    sha256. Without a cache folder nothing is kept and nothing is found."""

    def __init__(self, cache_dir, recording, atlas, settings: ParcellationSettings):
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self._recording, self._atlas, self._settings = recording, atlas, settings
        self._confounds: tuple[bytes, str] | None = None

    def confounds_data(self) -> bytes | None:
        """The confounds table's bytes when regression is asked for (read once)."""
        rec = self._recording
        if not (rec.confounds and self._settings.confounds):
            return None
        if self._confounds is None:
            data = Path(rec.confounds).read_bytes()
            self._confounds = (data, hashlib.sha256(data).hexdigest())
        return self._confounds[0]

    def key(self, source_hash: str) -> str:
        rec = self._recording
        confounds = self._confounds[1] if self.confounds_data() is not None else None
        key_src = {"source": source_hash, "atlas": self._atlas.hash,
                   "settings": self._settings.key(), "tr": rec.tr, "version": CACHE_VERSION,
                   "kind": rec.kind, "confounds": confounds}
        return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()

    def get(self, source_hash: str) -> Parcellated | None:
        if self.dir is None:
            return None
        return read_cached(self.dir, self.key(source_hash))

    def put(self, result: Parcellated) -> None:
        if self.dir is not None and result.cache_key is None:
            key = self.key(result.source_hash)
            _cache_write(self.dir, key, result)
            result.cache_key = key

    def predicted(self, path: Path) -> str | None:
        return remembered_hash(self.dir, path) if self.dir is not None else None

    def remember(self, path: Path, st, source_hash: str) -> None:
        if self.dir is not None:
            remember_hash(self.dir, path, st, source_hash)


def read_cached(cache_dir, key: str) -> Parcellated | None:
    """The cache entry `key` (a .npy array and a .json of the rest), None when absent."""
    base = Path(cache_dir) / key[:2] / key
    try:
        meta = read_json(base.with_suffix(".json"))
        signals = np.load(base.with_suffix(".npy"), allow_pickle=False)
        entry = Parcellated(signals=signals, coverage=np.array(meta["coverage"], dtype=bool),
                            tr_source=float(meta["tr_source"]),
                            n_timepoints_source=int(meta["n_timepoints_source"]),
                            source_hash=meta["source_hash"], notes=list(meta["notes"]),
                            cache_key=key)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: computed again
    ok = (signals.ndim == 2 and signals.dtype == np.float32 and len(entry.coverage) ==
          signals.shape[0] and bool(np.isfinite(signals).all())
          and meta.get("signals_sha256") == _content_hash(signals))
    return entry if ok else None  # an edited, damaged or older entry is never trusted


def _content_hash(signals: np.ndarray) -> str:
    """sha256 of the entry's values and shape: an entry edited to other finite values of the
    same shape no longer matches the hash its .json was written with."""
    import hashlib

    h = hashlib.sha256(str(signals.shape).encode())
    h.update(np.ascontiguousarray(signals).tobytes())
    return h.hexdigest()


def _cache_write(cache_dir: Path, key: str, result: Parcellated) -> None:
    from ..fileio import write_bytes_atomic, write_stream_atomic

    base = Path(cache_dir) / key[:2] / key
    write_stream_atomic(base.with_suffix(".npy"), lambda f: np.save(f, result.signals))
    meta = {"coverage": result.coverage.tolist(), "tr_source": result.tr_source,
            "n_timepoints_source": result.n_timepoints_source,
            "source_hash": result.source_hash, "notes": result.notes,
            "signals_sha256": _content_hash(result.signals)}
    write_bytes_atomic(base.with_suffix(".json"), json.dumps(meta).encode())
