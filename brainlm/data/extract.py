"""Parcel means of a 4-D NIfTI: the fast streaming engine and the nilearn reference.

- `extract_fast` (default): "resample the data to the atlas, then average each label" as one
  sparse [parcels, source voxels] operator (`LabelOperator`, trilinear weights), applied to
  volumes as they are decompressed (ISA-L, in a background thread). Memory stays at a few
  volumes and the run costs little more than reading the file.
- `extract_nilearn`: `NiftiLabelsMasker(resampling_target="labels")`, the reference. It loads
  the whole 4-D image and resamples every volume to the atlas grid before averaging.
Both take the recording's open `SourceFile` (the stream its header was parsed from, so the
file is read once) or, without one, open the file named in the `NiftiInfo`.
"""

from __future__ import annotations

import io
from contextlib import nullcontext

import numpy as np

from ..errors import InputError
from .nifti import NiftiInfo, describe_error


# coverage (`LabelOperator.covers`): the share of a parcel's weight on its own source voxels
# that must be valid (finite, non-zero, changing in time). With the old rule (any valid
# weight) a parcel whose own voxels were all zero was still "covered", by the 6-21 % of its
# weight its border interpolates from its neighbours (A424 on a 4 mm grid, 90 % of parcels)
MIN_OWN_WEIGHT = 0.25


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
        raw = raw.tocsr()
        # each source voxel's own parcel: the atlas label at its centre (`covers`)
        coo = raw.tocoo()
        cols = np.unique(coo.col)
        src = np.stack(np.unravel_index(cols, dims, order="F"), axis=1).astype(np.float64)
        to_atlas = np.linalg.inv(atlas.affine) @ affine
        at = np.round(src @ to_atlas[:3, :3].T + to_atlas[:3, 3]).astype(np.int64)
        ok = np.all((at >= 0) & (at < np.array(labels.shape)), axis=1)
        label = np.zeros(len(cols), labels.dtype)
        label[ok] = labels[tuple(at[ok].T)]
        owner = np.full(n_vox, -1, np.int64)
        known = label > 0
        owner[cols[known]] = np.searchsorted(atlas.label_values, label[known])
        mine = owner[coo.col] == coo.row
        self.own = sp.csr_matrix((coo.data[mine], (coo.row[mine], coo.col[mine])),
                                 shape=raw.shape)
        self.own_full = np.asarray(self.own.sum(axis=1)).ravel()
        self.support = np.bincount(parcel[inside], minlength=atlas.n_parcels)
        self.raw = raw
        self.n_voxels = n_vox

    def covers(self, valid: np.ndarray | None) -> np.ndarray:
        """bool [P]: parcels with at least MIN_OWN_WEIGHT of the weight on their own source
        voxels (those whose centre the atlas labels with the parcel) on `valid` ones; a parcel
        that owns no source voxel (small, on a coarse grid) needs any valid weight. Why:
        a parcel whose own voxels are empty (or constant) would otherwise be renormalised onto
        the valid voxels its border interpolates from, its neighbours' signal under its name,
        while one at the edge of the data's mask keeps its own voxels and stays."""
        full = np.asarray(self.raw.sum(axis=1)).ravel()
        if valid is None:
            return full > 1e-12
        v = valid.astype(np.float64)
        total = self.raw @ v
        own_total = self.own @ v
        own = self.own_full > 0
        return (total > 1e-12) & (~own | (own_total >= MIN_OWN_WEIGHT * self.own_full))

    def masked(self, valid: np.ndarray | None):
        """Operator restricted to valid source voxels (e.g. inside the data's brain mask),
        rows renormalised; also the boolean coverage per parcel."""
        import scipy.sparse as sp

        op = self.raw
        if valid is not None:
            op = op @ sp.diags(valid.astype(np.float64))
        total = np.asarray(op.sum(axis=1)).ravel()
        covered = self.covers(valid)
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


def _open_stream(info: NiftiInfo, source=None):
    """The decompressed content from byte 0: the recording's `SourceFile` when given (left
    open for its owner to finish), else the file named in `info`."""
    if source is not None:
        return nullcontext(source)
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


def extract_fast(info: NiftiInfo, atlas, chunk: int = 4,
                 source=None) -> tuple[np.ndarray, np.ndarray]:
    """Stream volumes through the label operator. Returns ([P, T] float64, coverage [P]).

    float64 throughout: a signal riding on a large offset (raw scanner units near 1e6) would
    lose its digits in float32 before cleaning removes the offset.

    `source`: the recording's open `SourceFile` (read from its start), else the file is opened."""
    op = _operator(atlas, info.shape[:3], info.affine)
    n_vox, n_t = op.n_voxels, info.shape[3]
    out = np.empty((n_t, atlas.n_parcels), dtype=np.float64)
    buf = np.empty((chunk, n_vox), dtype=info.dtype)
    view = memoryview(buf).cast("B")
    compact = used = covered = None
    try:
        with _open_stream(info, source) as f:
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
                    first_raw, changed = frames[0, used].copy(), np.zeros(len(used), bool)
                changed |= (frames[:n, used] != first_raw).any(axis=0)
                out[t0:t0 + n] = frames[:, used].astype(np.float64) @ compact
    except InputError:
        raise
    except Exception as exc:  # zlib/gzip/EOF errors from a damaged file
        raise InputError(info.path, describe_error(exc)) from None
    moving = np.zeros(op.n_voxels, bool)  # voxels whose value changes in time
    moving[used] = changed
    covered &= op.covers(valid & moving)  # a parcel constant in time carries no signal
    signals = out.T * float(info.slope) + float(info.inter)
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


def extract_nilearn(info: NiftiInfo, atlas, source=None) -> tuple[np.ndarray, np.ndarray]:
    """Reference path: NiftiLabelsMasker with the data resampled to the atlas grid.

    `source`: the recording's open `SourceFile`; its whole content is read into memory (the
    engine holds the whole 4-D image anyway) and the image built from those bytes."""
    import warnings

    from nilearn.maskers import NiftiLabelsMasker

    try:
        img = _whole_image(info, source)
        data = img.get_fdata(dtype=np.float32)  # surface read errors here, with the file's name
    except Exception as exc:
        raise InputError(info.path, describe_error(exc)) from None
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


def _whole_image(info: NiftiInfo, source):
    """The image with its data from the source's bytes when they hold every volume; else (no
    source, a damaged or short file) nibabel.load of the path, whose errors name the problem
    as they always did."""
    import nibabel as nib

    if source is not None and info.image_class is not None:
        try:
            content = source.read_all()
        except Exception:
            content = b""
        needed = info.offset + int(np.prod(info.shape)) * np.dtype(info.dtype).itemsize
        if len(content) >= needed:
            return info.image_class.from_stream(io.BytesIO(content))
    return nib.load(str(info.path))
