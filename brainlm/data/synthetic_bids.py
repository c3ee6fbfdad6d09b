"""A synthetic cohort written as a BIDS-like raw dataset: real 4-D NIfTI input for parcellation.

`write_bids` paints each parcel's series into its voxels on the atlas grid subsampled by
`coarse_grid`, adds a little independent voxel noise, and writes `sub-*/func/*_bold.nii.gz`
(deterministic gzip, so the same cohort gives byte-identical files), JSON sidecars,
participants.tsv, dataset_description.json and ground_truth.json. The cohort itself comes
from `brainlm.data.synthetic.simulate_cohort`.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from scipy import signal as sps

from ..errors import ConfigError
from ..fileio import atomic_dir, atomic_path, write_bytes_atomic

if TYPE_CHECKING:
    from .synthetic import SyntheticCohort


def coarse_grid(atlas, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """The atlas grid subsampled to `voxel_size` mm: (labels, affine), same origin and extent.

    Subsampling (not resampling) keeps voxel 0 where the atlas has it, so the MNI mapping is
    exact through the scaled affine; `voxel_size` must be an integer multiple of the atlas's.
    """
    affine = np.asarray(atlas.affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    ratio = voxel_size / zooms
    step = np.round(ratio).astype(int)
    if np.any(step < 1) or not np.allclose(ratio, step, atol=1e-3):
        raise ConfigError(f"voxel_size {voxel_size} mm must be an integer multiple of the "
                          f"atlas voxel size {tuple(np.round(zooms, 3))} mm")
    labels = atlas.labels[::step[0], ::step[1], ::step[2]]
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * step[None, :]
    return np.ascontiguousarray(labels), new


def _atomic_write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, zooms, tr: float) -> None:
    """Write header + Fortran-order data through gzip with mtime=0, so the same cohort gives
    byte-identical files (stable input hashes for the parcellation cache and DVC); nibabel's
    own .nii.gz writer stamps the current time."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_zooms(tuple(float(z) for z in zooms) + (float(tr),))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(affine, code=4)  # MNI152
    hdr.set_qform(affine, code=4)
    hdr.set_data_offset(352)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0

    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
        hdr.write_to(gz)  # 348-byte header + 4-byte extension flag = offset 352
        gz.write(np.asarray(data).tobytes(order="F"))


def write_bids(cohort: SyntheticCohort, atlas, out_dir, tr: float | None = None,
               voxel_size: float = 4.0, dtype: str = "int16",
               voxel_noise: float = 0.01) -> list[Path]:
    """Paint each parcel's signal into its voxels and write a BIDS-like raw dataset.

    Gives the parcellation step real 4-D NIfTI input. The grid is the atlas grid subsampled to
    `voxel_size` (4 mm by default: 8x smaller than 2 mm); each voxel gets its parcel's series
    plus independent noise with sd `voxel_noise` x the parcel's fluctuation sd, so voxels are not
    identical copies yet the parcel mean recovers the signal. Parcels with no voxel on the
    coarse grid are listed in ground_truth.json. Returns the NIfTI paths, one per subject.
    """
    tr = float(cohort.tr if tr is None else tr)
    signals = cohort.signals
    n_sub, n_parcels, n_time = signals.shape
    if n_parcels != atlas.n_parcels:
        raise ConfigError(f"cohort has {n_parcels} parcels but atlas {atlas.name} has "
                          f"{atlas.n_parcels}")
    if dtype not in ("int16", "float32"):
        raise ConfigError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    final = Path(out_dir)
    _check_replaceable(final)
    with atomic_dir(final) as out:
        missing = _write_dataset(cohort, atlas, out, tr, voxel_size, dtype, voxel_noise)
    if missing.size:
        warnings.warn(f"{missing.size} parcel(s) have no voxel on the {voxel_size} mm grid: "
                      f"{missing.tolist()}", stacklevel=2)
    pids = cohort.participants["participant_id"].astype(str)
    return [final / pid / "func" / f"{pid}_task-rest_bold.nii.gz" for pid in pids]


def _check_replaceable(out: Path) -> None:
    """Re-running synth replaces its own earlier output, never a folder of someone else's."""
    if out.is_file():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            desc = json.loads((out / "dataset_description.json").read_text())
            ours = any(g.get("Name") == "brainlm.data.synthetic" for g in desc["GeneratedBy"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"--out {out} exists and is not a brainlm synthetic dataset; "
                              "refusing to replace it (choose an empty or new folder)")


def _write_dataset(cohort, atlas, out: Path, tr: float, voxel_size: float, dtype: str,
                   voxel_noise: float) -> np.ndarray:
    signals = cohort.signals
    n_sub, n_parcels, n_time = signals.shape

    labels, affine = coarse_grid(atlas, voxel_size)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    flat = labels.ravel()
    vox = np.flatnonzero(flat)
    lab = flat[vox]
    known = np.isin(lab, atlas.label_values)
    vox, lab = vox[known], lab[known]
    parcel_of_vox = np.searchsorted(atlas.label_values, lab)
    missing = np.setdiff1d(atlas.label_values, lab)

    for i in range(n_sub):
        pid = str(cohort.participants["participant_id"].iloc[i])
        func = out / pid / "func"
        func.mkdir(parents=True, exist_ok=True)
        x = signals[i].astype(np.float64)
        sd = sps.detrend(x, axis=1).std(1)
        draw = cohort.draws[i] if cohort.draws else (cohort.seed, i)
        rng = np.random.default_rng([*draw, 1])  # independent of the cohort draws
        values = x[parcel_of_vox] + (voxel_noise * sd[parcel_of_vox])[:, None] * \
            rng.standard_normal((len(vox), n_time))
        use_int = dtype == "int16"
        if use_int:
            values = np.rint(values)
            if values.min() < -32768 or values.max() > 32767:
                warnings.warn(f"{pid}: values exceed int16, writing float32", stacklevel=2)
                use_int = False
        out_dtype = np.int16 if use_int else np.float32
        vol = np.zeros((flat.size, n_time), dtype=out_dtype)
        vol[vox] = values.astype(out_dtype)
        vol = vol.reshape(labels.shape + (n_time,))
        path = func / f"{pid}_task-rest_bold.nii.gz"
        _write_nifti(path, vol, affine, zooms, tr)
        _atomic_write_text(func / f"{pid}_task-rest_bold.json", json.dumps(
            {"RepetitionTime": tr, "TaskName": "rest",
             "Description": "synthetic BOLD painted onto atlas parcels (brainlm.data.synthetic)"},
            indent=2) + "\n")

    _atomic_write_text(out / "participants.tsv",
                       cohort.participants.to_csv(sep="\t", index=False, lineterminator="\n"))
    _atomic_write_text(out / "dataset_description.json", json.dumps(
        {"Name": "BrainLM synthetic resting-state cohort", "BIDSVersion": "1.9.0",
         "DatasetType": "raw",
         "GeneratedBy": [{"Name": "brainlm.data.synthetic"}]}, indent=2) + "\n")
    truth = {
        "atlas": {"name": atlas.name, "hash": atlas.hash},
        "tr": tr, "seed": cohort.seed, "n_subjects": n_sub, "n_timepoints": n_time,
        "voxel_size_mm": float(voxel_size), "voxel_noise": voxel_noise,
        "parcel_labels": [int(v) for v in atlas.label_values],
        "modules": [int(m) for m in cohort.modules],
        "parcels_missing_on_grid": [int(v) for v in missing],
        "effects": cohort.effects,
        "subjects": json.loads(cohort.truth.to_json(orient="records")) if len(cohort.truth)
        else [],
    }
    _atomic_write_text(out / "ground_truth.json", json.dumps(truth, indent=2) + "\n")
    return missing
