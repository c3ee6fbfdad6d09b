"""Parcellation atlases: A424 (BrainLM's), any integer-label NIfTI, and an offline fallback.

An `Atlas` is the label volume, its affine, the label values, one MNI coordinate per parcel
and optional names. Coordinates are the interface the model uses, so every atlas has them:
A424 ships its own table, other atlases get label centroids in MNI mm.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError
from .fileio import atomic_path, sha256_file

A424_FILES = {
    "A424+2mm.nii.gz": (
        "https://raw.githubusercontent.com/vandijklab/BrainLM/main/toolkit/atlases/A424%2B2mm.nii.gz",
        "8478d7516a2bbf295989835d5033d03e4283143a2955c90428f634951702501b",
    ),
    "A424_Coordinates.dat": (
        "https://raw.githubusercontent.com/vandijklab/BrainLM/main/toolkit/atlases/A424_Coordinates.dat",
        "cdad8f8859c211b1400211ebbad455dedcc4399ac14fd614354fb71b110c892c",
    ),
}
FALLBACK_NAME = "fallback-kmeans424"


@dataclass
class Atlas:
    name: str
    labels: np.ndarray  # int32 [X, Y, Z], 0 = background
    affine: np.ndarray  # float64 [4, 4], voxel -> MNI mm
    label_values: np.ndarray  # int [P], sorted
    coords: np.ndarray  # float32 [P, 3], MNI mm
    names: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def n_parcels(self) -> int:
        return len(self.label_values)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    @property
    def hash(self) -> str:
        """Content hash (labels, grid, coordinates): stable across file re-encodings."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels, dtype="<i4").tobytes())
        h.update(np.asarray(self.affine, dtype="<f8").tobytes())
        h.update(np.asarray(self.coords, dtype="<f4").tobytes())
        return h.hexdigest()[:16]

    def to_nifti(self):
        import nibabel as nib

        img = nib.Nifti1Image(self.labels.astype(np.int32), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_sform(self.affine, code=4)  # MNI152
        img.header.set_qform(self.affine, code=4)
        return img


def cache_dir() -> Path:
    root = os.environ.get("BRAINLM_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brainlm"


def _download(url: str, dest: Path, sha256: str, timeout: float = 20.0) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        got = sha256_file(tmp)
        if got != sha256:
            raise InputError(url, f"sha256 {got} does not match the pinned {sha256}")


def _remember(folder: Path, cached: Path) -> None:
    """Copy A424 found in BRAINLM_ATLAS_DIR into the user cache (checked against the pinned
    sha256), so a later process without the variable (a Prefect worker, a new shell) finds
    the same atlas instead of falling back to another one."""
    from .fileio import copy_file_atomic, sha256_file

    for fname, (_, sha) in A424_FILES.items():
        dest = cached / fname
        if dest.is_file() or sha256_file(folder / fname) != sha:
            continue
        try:
            copy_file_atomic(folder / fname, dest)
        except OSError:  # a read-only cache: the variable still works where it is set
            return


def find_a424(download: bool = True) -> Path | None:
    """Folder holding the verified A424 files: BRAINLM_ATLAS_DIR, the cache, or a download."""
    candidates = []
    if os.environ.get("BRAINLM_ATLAS_DIR"):
        candidates.append(Path(os.environ["BRAINLM_ATLAS_DIR"]))
    cached = cache_dir() / "atlases" / "A424"
    candidates.append(cached)
    for folder in candidates:
        if all((folder / f).is_file() for f in A424_FILES):
            if folder != cached:
                _remember(folder, cached)
            return folder
    if not download:
        return None
    try:
        for fname, (url, sha) in A424_FILES.items():
            if not (cached / fname).is_file():
                _download(url, cached / fname, sha)
    except (OSError, InputError) as exc:  # offline, proxy, or tampered file
        warnings.warn(f"A424 atlas could not be downloaded ({exc})", stacklevel=2)
        return None
    return cached


def _read_a424_coords(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    arr = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float32)
    return arr


XYZ = ("x", "y", "z")
NAME_COLUMNS = ("name", "names", "region", "label_name", "roi")
INDEX_COLUMNS = ("index", "label", "id", "parcel", "roi_index")


def atlas_from_coords(path) -> Atlas:
    """The parcels of already-parcellated tables from a coordinates file alone (no atlas
    image, so offline works): rows of x y z in MNI mm, comma-, tab- or space-separated, with
    or without a header (`x y z`, optionally `index` and `name` columns); without a header an
    extra leading numeric column is the index and a text column the name."""
    import pandas as pd

    path = Path(path)
    try:
        text = path.read_text()
        first = next(line for line in text.splitlines() if line.strip())
        sep = "\t" if "\t" in first else "," if "," in first else r"\s+"
        table = pd.read_csv(io.StringIO(text), sep=sep, header=None, dtype=str,
                            engine="python", skip_blank_lines=True).apply(lambda c: c.str.strip())
    except (OSError, StopIteration, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"unreadable coordinates table ({exc or 'the file is empty'})"
                         ) from None
    head = [str(v).lower() for v in table.iloc[0]]
    if set(XYZ) <= set(head):  # a header row names the columns
        table = table.iloc[1:].set_axis(head, axis=1)
        xyz, index = table[list(XYZ)], next((table[c] for c in INDEX_COLUMNS if c in head), None)
        names = next((table[c] for c in NAME_COLUMNS if c in head), None)
    else:
        numeric = [c for c in table if pd.to_numeric(table[c], errors="coerce").notna().all()]
        text = [c for c in table if c not in numeric]
        if pd.to_numeric(table.iloc[0], errors="coerce").isna().all():  # a header we do not know
            raise InputError(path, f"header {head} has no x, y and z columns")
        if len(numeric) not in (3, 4) or len(text) > 1:
            raise InputError(path, "expected rows of x, y, z in MNI mm (optionally an index "
                             f"first and a name column); got {table.shape[1]} columns")
        xyz, index = table[numeric[-3:]], table[numeric[0]] if len(numeric) == 4 else None
        names = table[text[0]] if text else None
    values = xyz.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).all(1))[0])
        raise InputError(path, f"row {bad + 1}: x, y, z must be finite numbers in MNI mm")
    labels = (np.arange(1, len(values) + 1) if index is None
              else pd.to_numeric(index, errors="coerce").to_numpy())
    if not np.isfinite(labels.astype(float)).all() or len(set(labels)) != len(labels):
        raise InputError(path, "the index column must hold distinct integers")
    return Atlas(name=path.stem, labels=np.zeros((1, 1, 1), np.int32), affine=np.eye(4),
                 label_values=labels.astype(int), coords=values.astype(np.float32),
                 names=[] if names is None else names.astype(str).tolist(), source=str(path))


def _read_names(path: Path, label_values: np.ndarray) -> list[str]:
    import pandas as pd

    table = pd.read_csv(path, sep="\t", header=None, comment="#")
    if table.shape[1] < 2:
        return []
    if not str(table.iloc[0, 0]).strip().lstrip("-").isdigit():  # header row
        table = table.iloc[1:]
    mapping = {int(float(i)): str(n) for i, n in zip(table.iloc[:, 0], table.iloc[:, 1])}
    return [mapping.get(int(v), f"parcel_{int(v)}") for v in label_values]


def label_centroids(labels: np.ndarray, affine: np.ndarray, label_values: np.ndarray) -> np.ndarray:
    """Centre of mass of each label in world (MNI mm) coordinates, [P, 3]."""
    flat = labels.ravel()
    keep = flat > 0
    ijk = np.stack(np.nonzero(labels), axis=1).astype(np.float64)  # C order == flat order
    lab = flat[keep]
    index = np.searchsorted(label_values, lab)
    counts = np.bincount(index, minlength=len(label_values)).astype(np.float64)
    sums = np.stack([np.bincount(index, weights=ijk[:, d], minlength=len(label_values))
                     for d in range(3)], axis=1)
    vox = sums / np.maximum(counts, 1)[:, None]
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    return world.astype(np.float32)


def atlas_from_nifti(path, coords_path=None, names_path=None, name=None) -> Atlas:
    """Any integer-label NIfTI. Centroids unless a coordinate table is given."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(path, f"cannot read atlas ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"atlas must be a 3-D label image, got shape {data.shape}")
    if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise InputError(path, "atlas values are not integer labels (probabilistic atlases "
                               "are not supported)")
    labels = np.round(data).astype(np.int32)
    values = np.unique(labels[labels > 0])
    if values.size == 0:
        raise InputError(path, "atlas has no labels > 0")
    affine = np.asarray(img.affine, dtype=np.float64)
    if coords_path is not None:
        coords = _read_a424_coords(Path(coords_path))
        if len(coords) != len(values):
            raise InputError(coords_path, f"{len(coords)} coordinates for {len(values)} labels "
                                          f"in {path.name}")
    else:
        coords = label_centroids(labels, affine, values)
    if names_path is None:
        for candidate in (path.with_name(path.name.split(".")[0] + ".tsv"),
                          path.with_name(path.name.split(".")[0] + "_labels.tsv")):
            if candidate.is_file():
                names_path = candidate
                break
    names = _read_names(Path(names_path), values) if names_path else []
    return Atlas(name=name or path.name.split(".")[0], labels=labels, affine=affine,
                 label_values=values, coords=coords, names=names, source=str(path))


def load_a424(folder: Path) -> Atlas:
    names = folder / "A424_labels.tsv"
    return atlas_from_nifti(folder / "A424+2mm.nii.gz", coords_path=folder / "A424_Coordinates.dat",
                            names_path=names if names.is_file() else None, name="A424")


def fallback_atlas(n_parcels: int = 424, seed: int = 0) -> Atlas:
    """A deterministic 424-parcel atlas made offline from nilearn's bundled MNI152 mask.

    k-means on the left hemisphere's voxel coordinates; right-hemisphere voxels take the
    mirrored parcel, so the atlas is symmetric like A424 (1..P/2 right, P/2+1..P left).
    Not anatomically meaningful: it exists so the demo runs without a network.
    """
    from nilearn.datasets import load_mni152_brain_mask
    from sklearn.cluster import KMeans

    cached = cache_dir() / "atlases" / f"{FALLBACK_NAME}-{n_parcels}-{seed}.nii.gz"
    if cached.is_file():
        return atlas_from_nifti(cached, name=FALLBACK_NAME)
    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(mask_img.dataobj) > 0
    affine = np.asarray(mask_img.affine, dtype=np.float64)
    ijk = np.stack(np.nonzero(mask), axis=1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    half = n_parcels // 2
    left = xyz[:, 0] < 0
    rng = np.random.default_rng(seed)
    fit_points = xyz[left][rng.permutation(int(left.sum()))[:20000]]
    km = KMeans(n_clusters=half, n_init=1, random_state=seed).fit(fit_points)
    mirrored = xyz.copy()
    mirrored[:, 0] = -np.abs(mirrored[:, 0])
    cluster = km.predict(mirrored)
    label = np.where(left, cluster + half + 1, cluster + 1)
    labels = np.zeros(mask.shape, dtype=np.int32)
    labels[tuple(ijk.T)] = label
    atlas = Atlas(name=FALLBACK_NAME, labels=labels, affine=affine,
                  label_values=np.arange(1, n_parcels + 1),
                  coords=label_centroids(labels, affine, np.arange(1, n_parcels + 1)),
                  source="generated from nilearn MNI152 brain mask")
    import nibabel as nib

    with atomic_path(cached) as tmp:
        nib.save(atlas.to_nifti(), str(tmp) + ".nii.gz")
        os.replace(str(tmp) + ".nii.gz", tmp)
    return atlas


def announce(atlas: Atlas, job: str, asked: str = "A424") -> None:
    """Say which atlas a run uses, first thing: the fallback in bold (on a terminal) and in
    capitals, since models made on it are not comparable with A424 ones."""
    import sys

    if atlas.name != FALLBACK_NAME:
        print(f"brainlm {job}: atlas {atlas.name} ({atlas.n_parcels} parcels, hash "
              f"{atlas.hash[:12]})", flush=True)
        return
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    why = ("as asked (--atlas)" if str(asked) == FALLBACK_NAME else "the A424 files were "
           "neither in BRAINLM_ATLAS_DIR nor downloadable into "
           f"{cache_dir() / 'atlases' / 'A424'}")
    print(f"{bold}brainlm {job}: ATLAS IS THE OFFLINE FALLBACK '{FALLBACK_NAME}', NOT A424{plain}"
          f"\n  {why}; results on it are not comparable with A424 models (the registry keeps "
          "them apart). README, 'Atlas', says how to get A424.", flush=True)


def load_atlas(spec: str | os.PathLike = "A424", allow_fallback: bool = False,
               download: bool = True) -> Atlas:
    """Resolve an atlas: "A424", a label NIfTI path, or a folder holding the A424 files.

    With `allow_fallback`, an unreachable A424 gives the offline k-means atlas with a warning
    (the demo's path); without it, the failure is an error that says how to fix it.
    """
    spec = str(spec)
    if spec.upper() == "A424":
        folder = find_a424(download=download)
        if folder is not None:
            return load_a424(folder)
        if allow_fallback:
            warnings.warn("A424 atlas not found (set BRAINLM_ATLAS_DIR or allow the download); "
                          f"using the offline generated atlas '{FALLBACK_NAME}' instead",
                          stacklevel=2)
            return fallback_atlas()
        raise ConfigError("A424 atlas not found: set BRAINLM_ATLAS_DIR to a folder with "
                          f"{', '.join(A424_FILES)}, or allow the download into {cache_dir()}")
    if spec == FALLBACK_NAME:
        return fallback_atlas()
    path = Path(spec)
    if path.is_dir() and all((path / f).is_file() for f in A424_FILES):
        return load_a424(path)
    if not path.exists():
        raise ConfigError(f"atlas '{spec}': no such file (use A424, {FALLBACK_NAME} or a "
                          "label NIfTI path)")
    return atlas_from_nifti(path)
