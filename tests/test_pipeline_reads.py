"""Preprocessing reads each input file once: the header, the volumes and the cache hash come
from one pass, and a cached recording is read only to hash it.

Opens are counted with a Python audit hook ("open" events: builtins.open, io.open, np.load,
pandas and nibabel all go through it), so the count covers every reader in the process.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainlm.data import parcellate as pc
from brainlm.data.ingest import Recording
from brainlm.data.parcellate import ParcellationSettings
from brainlm.data.pipeline import PreprocessConfig, run_preprocess
from brainlm.data.source import SourceFile, hash_file
from brainlm.fileio import sha256_file

_WATCHED: list[Counter] = []  # the counters of the `count_opens` blocks now running


def _audit(event, args):
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, Path)):
        path = str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()))
        for counter in _WATCHED:
            counter[path] += 1


sys.addaudithook(_audit)  # hooks cannot be removed; this one is idle outside count_opens


@contextmanager
def count_opens():
    """Counter {path: times opened} of every file opened inside the block (this process)."""
    counter: Counter = Counter()
    _WATCHED.append(counter)
    try:
        yield counter
    finally:
        _WATCHED.remove(counter)


def opens_of(counter: Counter, paths) -> dict:
    """{file name: opens} for `paths`, resolved as the readers name them."""
    counts: Counter = Counter()
    for opened, n in counter.items():
        counts[str(Path(opened).resolve())] += n
    return {Path(p).name: counts[str(Path(p).resolve())] for p in paths}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, atlas):
    """Four synthetic subjects as BIDS NIfTI (8 mm grid, 60 volumes)."""
    from brainlm.data.synthetic import simulate_cohort, write_bids

    out = tmp_path_factory.mktemp("reads") / "raw"
    sim = simulate_cohort(atlas.coords, n_subjects=4, n_timepoints=60, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parcels without a voxel on the coarse grid
        return write_bids(sim, atlas, out, voxel_size=8.0)


def _config(raw, out, atlas_spec, cache, **settings) -> PreprocessConfig:
    return PreprocessConfig(inputs=[raw], out=out, atlas=atlas_spec, fractions=(0.5, 0.25, 0.25),
                            settings=ParcellationSettings(min_timepoints=40, **settings),
                            workers=1, cache_dir=cache, progress=False)


def test_run_preprocess_opens_each_input_once_cold_and_warm(cohort, tmp_path, atlas, atlas_spec,
                                                            monkeypatch):
    raw = cohort[0].parents[2]
    cache = tmp_path / "cache"
    with count_opens() as cold:
        run_preprocess(_config(raw, tmp_path / "cold", atlas_spec, cache))
    # one read: header, volumes and the content hash of the cache key from the same pass
    assert opens_of(cold, cohort) == {p.name: 1 for p in cohort}

    computed = []
    real = pc._compute
    monkeypatch.setattr(pc, "_compute", lambda *a: computed.append(a) or real(*a))
    with count_opens() as warm:
        run_preprocess(_config(raw, tmp_path / "warm", atlas_spec, cache))
    assert computed == []  # every recording came from the cache ...
    assert opens_of(warm, cohort) == {p.name: 1 for p in cohort}  # ... read only to hash it
    for name in ("train.npy", "val.npy", "test.npy", "manifest.parquet", "scaler.safetensors"):
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "warm" / name).read_bytes()

    with count_opens() as uncached:  # no cache at all: still one read
        pc.parcellate_recording(Recording(path=cohort[0], subject="sub-x"), atlas,
                                ParcellationSettings(min_timepoints=40))
    assert opens_of(uncached, cohort[:1]) == {cohort[0].name: 1}


def test_the_nilearn_engine_reads_the_file_once_too(atlas, painter, tmp_path):
    rng = np.random.default_rng(6)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 24))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "sub-1_bold.nii.gz", step=4)
    settings = ParcellationSettings(min_timepoints=20, engine="nilearn")
    with count_opens() as opened:
        got = pc.parcellate_recording(Recording(path=path, subject="sub-1"), atlas, settings)
    assert opens_of(opened, [path]) == {path.name: 1}
    info = pc.read_nifti_info(path)  # the engine on the file itself: the same numbers
    ref, covered = pc.extract_nilearn(info, atlas)
    want = pc.resample_tr(pc.clean(ref, covered, info.tr, settings), info.tr, settings.target_tr)
    np.testing.assert_array_equal(got.signals, want)


def test_tables_and_confounds_are_read_once(tmp_path, atlas, painter):
    rng = np.random.default_rng(0)
    table = tmp_path / "sub-t_timeseries.tsv"
    np.savetxt(table, 100 + rng.standard_normal((50, atlas.n_parcels)), delimiter="\t")
    bold = painter(atlas, (10000 + 30 * rng.standard_normal((atlas.n_parcels, 50)))
                   .astype(np.float32), tmp_path / "sub-c_task-rest_bold.nii.gz", step=4)
    confounds = tmp_path / "sub-c_task-rest_desc-confounds_timeseries.tsv"
    confounds.write_text("a\n" + "".join(f"{v:.4f}\n" for v in rng.standard_normal(50)))
    recs = [Recording(path=table, subject="sub-t", kind="timeseries", tr=0.735),
            Recording(path=bold, subject="sub-c", confounds=confounds)]
    settings = ParcellationSettings(min_timepoints=40, confounds=("a",))
    with count_opens() as opened:
        first = pc.parcellate_recording(recs[0], atlas, ParcellationSettings(min_timepoints=40),
                                        tmp_path / "cache")
        second = pc.parcellate_recording(recs[1], atlas, settings, tmp_path / "cache")
    assert opens_of(opened, [table, bold, confounds]) == {table.name: 1, bold.name: 1,
                                                          confounds.name: 1}
    assert first.source_hash == sha256_file(table) and second.source_hash == sha256_file(bold)


def test_source_file_hashes_every_byte_once_and_replays_its_head(tmp_path):
    payload = np.random.default_rng(1).bytes(3 << 20)
    plain, packed = tmp_path / "x.nii", tmp_path / "x.nii.gz"
    plain.write_bytes(payload)
    packed.write_bytes(gzip.compress(payload))  # 5000 bytes read below: finish hashes the rest
    for path in (plain, packed):
        with SourceFile(path) as source:
            assert source.peek(10) == payload[:10]
            assert source.peek(2000) == payload[:2000]
            buf = bytearray(5000)
            view, got = memoryview(buf), 0
            while got < len(buf):
                got += source.readinto(view[got:])
            assert bytes(buf) == payload[:5000]  # the peeked bytes, then the stream
            assert source.finish() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert hash_file(path)[0] == sha256_file(path)
        with SourceFile(path) as source:
            assert source.read_all() == payload


def _nifti_variants(atlas, painter, tmp_path) -> list[Path]:
    rng = np.random.default_rng(2)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 12))).astype(np.float32)
    plain = painter(atlas, signals, tmp_path / "a.nii", step=4)
    scaled = painter(atlas, signals, tmp_path / "b.nii.gz", step=4, dtype=np.int16)
    img = nib.load(str(plain))
    two = nib.Nifti2Image(np.asanyarray(img.dataobj), img.affine)
    two.header.set_zooms(img.header.get_zooms())
    nib.save(two, str(tmp_path / "c.nii.gz"))
    ext = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    ext.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 3000))
    nib.save(ext, str(tmp_path / "d.nii.gz"))
    return [plain, scaled, tmp_path / "c.nii.gz", tmp_path / "d.nii.gz"]


def test_header_from_the_stream_equals_nibabel_load(atlas, painter, tmp_path):
    from brainlm.data.nifti import _image_from_stream

    for path in _nifti_variants(atlas, painter, tmp_path):
        with SourceFile(path) as source:
            assert _image_from_stream(source, path) is not None, path.name  # not the fallback
            streamed = pc.read_nifti_info(path, source=source)
        loaded = pc.read_nifti_info(path)
        for field in ("shape", "dtype", "slope", "inter", "offset", "tr", "compressed",
                      "header_tr", "notes", "image_class"):
            assert getattr(streamed, field) == getattr(loaded, field), (path.name, field)
        np.testing.assert_array_equal(streamed.affine, loaded.affine)
        with SourceFile(path) as source:  # and the same numbers through either reader
            got = pc.extract_fast(pc.read_nifti_info(path, source=source), atlas, source=source)
        want = pc.extract_fast(loaded, atlas)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_same_content_under_another_name_comes_from_the_cache(atlas, painter, tmp_path):
    """The cache is keyed on content: a copy that its name makes unparseable (gzip bytes named
    .nii) gets the entry of its twin, as when every file was hashed before being parsed."""
    rng = np.random.default_rng(4)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 50))).astype(np.float32)
    good = painter(atlas, signals, tmp_path / "sub-1_bold.nii.gz", step=4)
    twin = tmp_path / "sub-2_bold.nii"
    twin.write_bytes(good.read_bytes())
    settings = ParcellationSettings(min_timepoints=40)
    first = pc.parcellate_recording(Recording(path=good, subject="sub-1"), atlas, settings,
                                    tmp_path / "cache")
    again = pc.parcellate_recording(Recording(path=twin, subject="sub-2"), atlas, settings,
                                    tmp_path / "cache")
    np.testing.assert_array_equal(first.signals, again.signals)
    with pytest.raises(Exception, match="unreadable NIfTI"):  # without the cache: refused
        pc.parcellate_recording(Recording(path=twin, subject="sub-2"), atlas, settings)


def test_a_stale_prediction_is_checked_against_the_content(atlas, painter, tmp_path):
    """The remembered hash only predicts; a file rewritten with the same size and mtime is
    hashed, found changed and parcellated again."""
    import os

    from brainlm.data.source import remembered_hash

    rng = np.random.default_rng(5)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, 50))).astype(np.float32)
    path = painter(atlas, signals, tmp_path / "sub-1_bold.nii", step=4)  # fixed size
    rec, settings = Recording(path=path, subject="sub-1"), ParcellationSettings(min_timepoints=40)
    first = pc.parcellate_recording(rec, atlas, settings, tmp_path / "cache")
    st = path.stat()
    painter(atlas, signals * 1.01, path, step=4)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    if path.stat().st_ino != st.st_ino:
        pytest.skip("the writer replaced the file: no stale stat to test")
    assert remembered_hash(tmp_path / "cache", path) == first.source_hash  # a wrong prediction
    second = pc.parcellate_recording(rec, atlas, settings, tmp_path / "cache")
    assert second.source_hash == sha256_file(path) != first.source_hash
    assert not np.array_equal(first.signals, second.signals)


def test_the_flow_collects_a_task_result_from_the_cache_entry(cohort, tmp_path, atlas_spec):
    """What `_preprocess_recordings` does with a task's result: the entry for the hash the task
    used, found without reading the file, its thresholds checked again; recomputed when the
    entry is gone."""
    import dataclasses
    import shutil

    from brainlm.data.pipeline import collect_parcellated, parcellate_one, plan_preprocess

    cfg = _config(cohort[0].parents[2], tmp_path / "s", atlas_spec, tmp_path / "cache")
    plan = plan_preprocess(cfg)
    index = plan.todo[0]
    path = plan.recordings[index].path
    _, done, _ = parcellate_one(plan, index, cfg.settings)
    flow_plan = plan_preprocess(cfg)  # the flow's own plan knows no hash
    with count_opens() as opened:
        _, got, problem = collect_parcellated(flow_plan, index, cfg.settings, done.source_hash)
    assert problem is None and opens_of(opened, [path]) == {path.name: 0}
    np.testing.assert_array_equal(got.signals, done.signals)
    strict = dataclasses.replace(cfg.settings, min_timepoints=1000)
    _, none, problem = collect_parcellated(flow_plan, index, strict, done.source_hash)
    assert none is None and "too few timepoints" in problem
    shutil.rmtree(tmp_path / "cache")
    with count_opens() as opened:
        _, again, problem = collect_parcellated(flow_plan, index, cfg.settings, done.source_hash)
    assert problem is None and opens_of(opened, [path]) == {path.name: 1}
    np.testing.assert_array_equal(again.signals, done.signals)
