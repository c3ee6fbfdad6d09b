"""The processed dataset on disk, and windows of it for a DataLoader.

Layout of a store folder:
    store.json           version, parcel count, TR, atlas, scaler hash, split sizes
    manifest.parquet     one row per recording (kept or quarantined), phenotypes joined
    parcels.parquet      label, name and MNI coordinates of every parcel (the model's input)
    scaler.safetensors   the training-split robust scaler
    {train,val,test}.npy one flat float32 array per split; recording i is the [P, T_i] block
                         at `offset` (C order): a window is P short runs inside one recording's
                         block, and np.load(mmap_mode="r") reads only what is asked for.
A store is written whole into a temporary folder and then renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, check_orientation
from ..fileio import read_json
from ..fileio import atomic_dir
from .split import SPLITS

STORE_VERSION = "1"


STORE_FILES = ("store.json", "manifest.parquet", "parcels.parquet", "scaler.safetensors",
               "train.npy", "val.npy", "test.npy")


def check_replaceable(out: Path) -> None:
    """An earlier store may be replaced; anything else that is not empty may not."""
    from ..fileio import check_replaceable as replaceable

    replaceable(out, "brainlm store", "store.json", STORE_FILES)


def write_store(out_dir, kept: list[dict], quarantined: list[dict], scaler, atlas,
                extra_meta: dict | None = None) -> Path:
    """Write scaled recordings, the scaler and the manifest into a fresh folder, then swap it
    in place of `out_dir`: a failed run leaves the previous store whole.

    `kept` rows carry `signals` (scaled [P, T] float32) and `split` beside manifest fields.
    """
    out = Path(out_dir)
    check_replaceable(out)
    with atomic_dir(out) as tmp:
        _write_store_files(tmp, kept, quarantined, scaler, atlas, extra_meta)
    return out


def reserve(path: Path) -> None:
    """Allocate the blocks of a (sparse) memory-mapped file now: on a full disk this is an
    OSError naming the file, where writing through the map later would kill the process with
    a bus error."""
    import errno
    import os

    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # file systems without it: go on
            return
        raise OSError(exc.errno, f"{exc.strerror} (needs {size:,} bytes)", str(path)) from None
    finally:
        os.close(fd)


def _write_store_files(out: Path, kept, quarantined, scaler, atlas, extra_meta) -> None:
    import pandas as pd

    rows = []
    for split in SPLITS:
        members = [r for r in kept if r["split"] == split]
        total = sum(int(np.prod(r["signals"].shape)) for r in members)
        flat = np.lib.format.open_memmap(out / f"{split}.npy", mode="w+", dtype=np.float32,
                                         shape=(total,))
        reserve(out / f"{split}.npy")
        offset = 0
        for r in members:
            x = check_orientation(r["signals"], atlas.n_parcels, f"store write {r['recording_id']}")
            flat[offset:offset + x.size] = x.ravel()
            rows.append({**{k: v for k, v in r.items() if k != "signals"},
                         "offset": offset, "n_parcels": x.shape[0], "n_timepoints": x.shape[1]})
            offset += x.size
        flat.flush()
        del flat
    rows += [{**q, "split": None, "offset": -1} for q in quarantined]
    manifest = pd.DataFrame(rows)
    for col in ("n_parcels", "n_timepoints", "n_timepoints_source"):
        if col in manifest:
            manifest[col] = manifest[col].astype("Int64")
    parcels = pd.DataFrame({"label": atlas.label_values.astype(int),
                            "name": atlas.names or [f"parcel_{int(v)}" for v in atlas.label_values],
                            "x": atlas.coords[:, 0], "y": atlas.coords[:, 1], "z": atlas.coords[:, 2],
                            "has_data": scaler.has_data})
    parcels.to_parquet(out / "parcels.parquet", index=False)
    scaler.save(out / "scaler.safetensors")
    meta = {"version": STORE_VERSION, "n_parcels": atlas.n_parcels, "tr": scaler.meta.get("tr"),
            "atlas": atlas.name, "atlas_hash": atlas.hash,
            "splits": {s: {"recordings": int(sum(r["split"] == s for r in kept)),
                           "subjects": len({r["subject"] for r in kept if r["split"] == s})}
                       for s in SPLITS}, **(extra_meta or {})}
    (out / "store.json").write_text(json.dumps(meta, indent=2, default=str))
    manifest.to_parquet(out / "manifest.parquet", index=False)


def store_fingerprint(path) -> str:
    """sha256 over what a rebuild changes (settings, manifest with phenotypes and splits, the
    scaler), without reading the signal arrays: a run made on a store records it, so a store
    rebuilt since is told apart from the one the run saw."""
    import hashlib

    from ..fileio import sha256_file

    h = hashlib.sha256()
    for name in ("store.json", "manifest.parquet", "scaler.safetensors"):
        f = Path(path) / name
        h.update(f"{name}:{sha256_file(f) if f.is_file() else '-'};".encode())
    return h.hexdigest()


class BrainStore:
    """Read side of a store: manifest, coordinates, scaler, and memory-mapped recordings."""

    def __init__(self, path):
        import pandas as pd

        self.path = Path(path)
        if not (self.path / "manifest.parquet").is_file():
            raise ConfigError(f"{self.path}: not a processed store (no manifest.parquet); run "
                              "`brainlm preprocess` first")
        self.meta = self._read("store.json", read_json)
        if not isinstance(self.meta, dict) or not {"n_parcels", "tr"} <= set(self.meta):
            raise self._damaged("store.json", "no n_parcels or tr")
        self.manifest = self._read("manifest.parquet", pd.read_parquet)
        self.parcels = self._read("parcels.parquet", pd.read_parquet)
        for name, frame, columns in (
                ("manifest.parquet", self.manifest, ("recording_id", "subject", "split", "status",
                                                     "offset", "n_parcels", "n_timepoints")),
                ("parcels.parquet", self.parcels, ("x", "y", "z"))):
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise self._damaged(name, f"no column {', '.join(missing)}")
        self._arrays: dict[str, np.ndarray] = {}
        from .scale import RobustScaler

        self._scaler = self._read("scaler.safetensors", RobustScaler.load)  # checked here
        ok = self.manifest[self.manifest["status"] == "ok"]
        for split, rows in ok.groupby("split"):  # each array holds what the manifest says
            need = int((rows["offset"] + rows["n_parcels"] * rows["n_timepoints"]).max())
            if len(self._array(split)) < need:
                raise self._damaged(f"{split}.npy", f"{len(self._array(split))} values, the "
                                    f"manifest needs {need}")

    def _damaged(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path / name}: damaged store file ({problem}); write the store "
                           "again with `brainlm preprocess`")

    def _read(self, name: str, reader):
        try:
            return reader(self.path / name)
        except Exception as exc:  # missing, truncated, not JSON/parquet: named, never a trace
            raise self._damaged(name, f"{type(exc).__name__}: {exc}") from None

    @property
    def n_parcels(self) -> int:
        return int(self.meta["n_parcels"])

    @property
    def tr(self) -> float:
        return float(self.meta["tr"])

    @property
    def coords(self) -> np.ndarray:
        return np.array(self.parcels[["x", "y", "z"]], dtype=np.float32)  # writable copy

    def scaler(self):
        return self._scaler

    def recordings(self, split: str | None = None):
        """Kept recordings (status ok), optionally of one split, in storage order."""
        if split is not None and split not in SPLITS:
            raise ConfigError(f"unknown split '{split}' (use one of {SPLITS})")
        m = self.manifest[self.manifest["status"] == "ok"]
        if split is not None:
            m = m[m["split"] == split]
        return m.reset_index(drop=True)

    def _array(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            self._arrays[split] = self._read(f"{split}.npy", lambda f: np.load(
                f, mmap_mode="r", allow_pickle=False))
        return self._arrays[split]

    def load(self, row) -> np.ndarray:
        """One recording, [P, T] (a read-only memory map, nothing is loaded until touched)."""
        p, t, off = int(row["n_parcels"]), int(row["n_timepoints"]), int(row["offset"])
        x = self._array(row["split"])[off:off + p * t].reshape(p, t)
        return check_orientation(x, self.n_parcels, f"store read {row['recording_id']}")

    def __getstate__(self):  # DataLoader workers re-open the memory maps themselves
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class WindowDataset:
    """Windows of T timepoints from one split, as a map-style dataset for torch's DataLoader.

    mode="random": each item is a random window of recording `i % n`, reproducible from
    (seed, epoch, i) so a resumed run sees the same windows; call `set_epoch` per epoch.
    mode="sliding": windows at starts 0, stride, 2*stride, ... plus one ending at the last
    timepoint when the stride does not reach it, so every timepoint is covered (evaluation).
    Items: {"signal": float32 [P, T], "recording": int, "start": int}. No torch import here.
    """

    def __init__(self, store: BrainStore, split: str, window: int = 200, mode: str = "random",
                 stride: int | None = None, windows_per_recording: int = 1, seed: int = 0):
        if mode not in ("random", "sliding"):
            raise ConfigError(f"window mode '{mode}' must be 'random' or 'sliding'")
        if window < 1:
            raise ConfigError(f"window length {window} must be positive")
        self.store, self.split, self.window, self.mode = store, split, int(window), mode
        self.rows = store.recordings(split)
        if len(self.rows) == 0:
            raise ConfigError(f"{store.path}: split '{split}' has no recordings")
        short = self.rows[self.rows["n_timepoints"] < window]
        if len(short):
            raise ConfigError(f"{store.path}: {len(short)} recordings in '{split}' are shorter "
                              f"than the window ({window}), e.g. {short.iloc[0]['recording_id']}")
        self.seed, self.epoch, self.per_recording = seed, 0, int(windows_per_recording)
        if mode == "sliding":
            stride = int(stride or window)
            self.index = []
            for i, t in enumerate(self.rows["n_timepoints"]):
                starts = list(range(0, int(t) - window + 1, stride))
                if starts[-1] != int(t) - window:
                    starts.append(int(t) - window)
                self.index += [(i, s) for s in starts]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.mode == "sliding":
            return len(self.index)
        return len(self.rows) * self.per_recording

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.mode == "sliding":
            rec, start = self.index[i]
        else:
            rec = i % len(self.rows)
            n_t = int(self.rows.at[rec, "n_timepoints"])
            rng = np.random.default_rng([self.seed, self.epoch, i])
            start = int(rng.integers(0, n_t - self.window + 1))
        x = self.store.load(self.rows.iloc[rec])[:, start:start + self.window]
        return {"signal": np.array(x, dtype=np.float32), "recording": rec, "start": start}
