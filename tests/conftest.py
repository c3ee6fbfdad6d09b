"""Shared fixtures. No test needs the network: the atlas comes from BRAINLM_ATLAS_DIR (the
shared data folder in CI) or, where that is missing, from the offline generated atlas."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "atlases"
if not os.environ.get("BRAINLM_ATLAS_DIR") and (_SHARED / "A424+2mm.nii.gz").is_file():
    os.environ["BRAINLM_ATLAS_DIR"] = str(_SHARED)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """A private user cache so tests never read or pollute ~/.cache/brainlm."""
    cache = tmp_path_factory.mktemp("brainlm-cache")
    old = os.environ.get("BRAINLM_CACHE_DIR")
    os.environ["BRAINLM_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("BRAINLM_CACHE_DIR", None)
    else:
        os.environ["BRAINLM_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """`run_stage` points MLFLOW_TRACKING_URI at its project's store for the process; a test
    that calls it in-process must not send later tests' runs (and subprocesses) there."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def atlas_spec(_isolated_cache) -> str:
    """'A424' when its files are reachable without a download, else the offline atlas."""
    from brainlm.atlas import FALLBACK_NAME, find_a424

    return "A424" if find_a424(download=False) is not None else FALLBACK_NAME


@pytest.fixture(scope="session")
def atlas(atlas_spec):
    from brainlm.atlas import load_atlas

    return load_atlas(atlas_spec, download=False)


def paint_nifti(atlas, signals: np.ndarray, path, tr: float = 0.735, step: int = 1,
                dtype=np.float32, background: float = 0.0):
    """Write parcel signals [P, T] into every voxel of their parcel (atlas grid subsampled by
    `step`), as a 4-D NIfTI with the TR in the header. Returns the path."""
    import nibabel as nib

    labels = atlas.labels[::step, ::step, ::step]
    affine = atlas.affine.copy()
    affine[:3, :3] *= step
    vol = np.full(labels.shape + (signals.shape[1],), background,
                  dtype=np.float64 if dtype == np.float64 else np.float32)
    inside = labels > 0
    vol[inside] = signals[np.searchsorted(atlas.label_values, labels[inside])]
    img = nib.Nifti1Image(vol, affine)
    img.set_data_dtype(dtype)  # integer types get a scale factor chosen by nibabel
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(tuple(abs(np.diag(affine)[:3])) + (tr,))
    img.header.set_sform(affine, code=4)
    img.header.set_qform(affine, code=4)
    nib.save(img, str(path))
    return Path(path)


@pytest.fixture
def painter():
    return paint_nifti


# The longest test files first: `make test` runs one file per worker (pytest-xdist,
# --dist loadfile) in collection order, so a long file collected last would run alone at the
# end while the other core idles.
_LONGEST_FIRST = ("test_dvc.py", "test_recipe.py", "test_services.py", "test_flows.py",
                  "test_faults.py", "test_end_to_end.py", "test_hpo.py", "test_pretrain.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept
