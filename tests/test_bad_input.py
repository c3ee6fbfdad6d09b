"""Every kind of bad input: one clear message naming the file, the others go on, nothing lost."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainlm.cli import main
from brainlm.data.store import BrainStore

T = 60  # timepoints of the good recordings; the window is 50
STEP = 4  # 8 mm grid: small files


def _good(atlas, painter, root, sub, seed=0, **kw):
    rng = np.random.default_rng(seed)
    signals = (10000 + 30 * rng.standard_normal((atlas.n_parcels, T))).astype(np.float32)
    folder = root / sub / "func"
    folder.mkdir(parents=True, exist_ok=True)
    return painter(atlas, signals, folder / f"{sub}_task-rest_bold.nii.gz", step=STEP, **kw)


def _nifti(path, data, affine, tr=0.735, codes=4):
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms(tuple(abs(np.diag(affine)[:3])) + (tr,))
    img.header.set_sform(affine, code=codes)
    img.header.set_qform(affine, code=codes)
    if codes == 0:  # nibabel writes an aligned sform for an image made with an affine
        img = nib.Nifti1Image(img.dataobj, None, img.header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture
def messy(tmp_path, atlas, painter):
    """Four good subjects and one of each kind of bad recording."""
    raw = tmp_path / "raw"
    for i in range(4):
        _good(atlas, painter, raw, f"sub-ok{i}", seed=i)
    bad = {}
    ref = _good(atlas, painter, tmp_path / "ref", "sub-ref")
    img = nib.load(str(ref))
    data, affine = np.asarray(img.dataobj), img.affine

    bad["3d"] = _nifti(raw / "sub-b3d/func/sub-b3d_task-rest_bold.nii.gz", data[..., 0], affine)
    bad["short"] = _nifti(raw / "sub-bshort/func/sub-bshort_task-rest_bold.nii.gz",
                          data[..., :20], affine)
    nan = data.copy()
    nan[tuple(np.argwhere(nan[..., 0] > 0)[100]) + (3,)] = np.inf  # one voxel, one volume
    bad["nan"] = _nifti(raw / "sub-bnan/func/sub-bnan_task-rest_bold.nii.gz", nan, affine)
    bad["nospace"] = _nifti(raw / "sub-bnospace/func/sub-bnospace_task-rest_bold.nii.gz",
                            data, affine, codes=0)
    far = affine.copy()
    far[:3, 3] += 1000.0
    bad["notmni"] = _nifti(raw / "sub-bfar/func/sub-bfar_task-rest_bold.nii.gz", data, far)
    bad["notr"] = _nifti(raw / "sub-bnotr/func/sub-bnotr_task-rest_bold.nii.gz", data, affine,
                         tr=0.0)
    slab = data.copy()
    slab[:, :, :11] = 0  # only one 8 mm slice has signal
    slab[:, :, 12:] = 0
    bad["coverage"] = _nifti(raw / "sub-bcov/func/sub-bcov_task-rest_bold.nii.gz", slab, affine)
    whole = ref.read_bytes()
    trunc = raw / "sub-btrunc/func/sub-btrunc_task-rest_bold.nii.gz"
    trunc.parent.mkdir(parents=True)
    trunc.write_bytes(whole[: len(whole) // 2])
    garbage = raw / "sub-bgarbage/func/sub-bgarbage_task-rest_bold.nii.gz"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(gzip.compress(b"not a nifti at all" * 100)[:50] + b"\x00" * 500)
    bad["trunc"], bad["garbage"] = trunc, garbage
    # duplicate subject ids in the phenotype table
    for sub in ("sub-dup",):
        _good(atlas, painter, raw, sub, seed=9)
    table = pd.DataFrame({"participant_id": ["sub-ok0", "sub-ok1", "sub-ok2", "sub-ok3",
                                             "sub-dup", "sub-dup"],
                          "age": [20, 30, 40, 50, 60, 61]})
    table.to_csv(raw / "participants.tsv", sep="\t", index=False)
    shutil.rmtree(tmp_path / "ref")
    return raw, bad


EXPECTED = {
    "3d": "3-D image",
    "short": "too few timepoints",
    "nan": "NaN/Inf",
    "nospace": "no sform/qform",
    "notmni": "does not overlap the atlas",
    "notr": "missing TR",
    "coverage": "parcels have no signal",
    "trunc": "truncated",
    "garbage": "unreadable NIfTI",
}


def test_each_bad_recording_is_quarantined_with_its_reason(messy, tmp_path, atlas_spec, capsys):
    raw, bad = messy
    out = tmp_path / "store"
    code = main(["preprocess", "--input", str(raw), "--out", str(out), "--window", "50",
                 "--atlas", atlas_spec, "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    printed = capsys.readouterr()
    manifest = BrainStore(out).manifest
    by_path = manifest.set_index("source_path")
    for kind, path in bad.items():
        row = by_path.loc[str(path.resolve())]
        assert row["status"] == "quarantined", kind
        assert EXPECTED[kind] in row["reason"], (kind, row["reason"])
        line = next(line for line in printed.out.splitlines() if str(path) in line)
        assert EXPECTED[kind] in line  # one line, naming the file and the problem
    dup = manifest[manifest["subject"] == "sub-dup"].iloc[0]
    assert dup["status"] == "quarantined" and "appears 2 times" in dup["reason"]
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["subject"]) == [f"sub-ok{i}" for i in range(4)]
    assert "Traceback" not in printed.out + printed.err


def test_partial_coverage_is_kept_and_reported(tmp_path, atlas, painter, atlas_spec, capsys):
    raw = tmp_path / "raw"
    for i in range(3):
        _good(atlas, painter, raw, f"sub-{i}", seed=i)
    path = _good(atlas, painter, raw, "sub-part", seed=7)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[:, :, 15:] = 0  # the top of the brain is missing
    _nifti(path, data, img.affine)
    assert main(["preprocess", "--input", str(raw), "--out", str(tmp_path / "s"), "--window",
                 "50", "--atlas", atlas_spec, "--no-progress", "--split", "1,0,0"]) == 0
    out = capsys.readouterr().out
    assert "parcels without coverage: 1 recordings" in out
    row = BrainStore(tmp_path / "s").manifest.set_index("subject").loc["sub-part"]
    assert row["status"] == "ok" and len(row["uncovered"]) > 0
    x = BrainStore(tmp_path / "s").load(row.to_dict() | {"recording_id": "sub-part"})
    index = np.searchsorted(atlas.label_values, row["uncovered"])
    assert np.all(x[index] == 0)  # scaled to the typical value, not a fake signal


def test_table_with_wrong_column_count_and_transposed(tmp_path, atlas, atlas_spec, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pd.DataFrame(rng.standard_normal((60, atlas.n_parcels)) + 100).to_csv(
            raw / f"sub-{i}_task-rest_timeseries.tsv", sep="\t", index=False)
    pd.DataFrame(rng.standard_normal((60, atlas.n_parcels - 24))).to_csv(
        raw / "sub-wrong_task-rest_timeseries.tsv", sep="\t", index=False)
    np.save(raw / "sub-flip_task-rest_timeseries.npy", rng.standard_normal((atlas.n_parcels, 60)))
    code = main(["preprocess", "--input", str(raw), "--out", str(tmp_path / "s"), "--window",
                 "50", "--atlas", atlas_spec, "--input-tr", "0.735", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"sub-wrong_task-rest_timeseries.tsv: {atlas.n_parcels - 24} columns but the " \
           f"coordinates list {atlas.n_parcels} parcels" in out
    assert "sub-flip_task-rest_timeseries.npy: shape (424, 60) looks like parcels x time" in out


def test_no_usable_recording_fails_clearly_and_keeps_the_old_store(
        tmp_path, atlas, painter, atlas_spec, capsys):
    raw = tmp_path / "raw"
    for i in range(3):
        _good(atlas, painter, raw, f"sub-{i}", seed=i)
    out = tmp_path / "store"
    args = ["--out", str(out), "--window", "50", "--atlas", atlas_spec, "--no-progress"]
    assert main(["preprocess", "--input", str(raw)] + args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken"
    _nifti(broken / "sub-x/func/sub-x_task-rest_bold.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
    capsys.readouterr()
    assert main(["preprocess", "--input", str(broken)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no recording could be processed (1 quarantined)")
    assert "sub-x_task-rest_bold.nii.gz: 3-D image" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".store.*"))  # no temporary leftovers


def test_failed_write_leaves_previous_store_whole(tmp_path, atlas, painter, atlas_spec,
                                                  monkeypatch):
    raw = tmp_path / "raw"
    for i in range(3):
        _good(atlas, painter, raw, f"sub-{i}", seed=i)
    out = tmp_path / "store"
    args = ["preprocess", "--input", str(raw), "--out", str(out), "--window", "50", "--atlas",
            atlas_spec, "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from brainlm.data.scale import RobustScaler

    def boom(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(RobustScaler, "save", boom)
    assert main(args) == 2  # a system error: one line, no traceback
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["raw", "store"]


@pytest.mark.parametrize("argv, message", [
    (["--tr", "-1"], "--tr: -1 must be >= 0.05"),
    (["--workers", "0"], "must be >= 1"),
    (["--split", "0.5,0.5"], "three values"),
    (["--split", "0.9,0.9,0.1"], "summing to 1"),
    (["--high-pass", "5"], "Nyquist"),
    (["--atlas", "/no/such/atlas.nii.gz"], "no such file"),
])
def test_bad_settings_get_one_clear_message(tmp_path, argv, message, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    try:
        code = main(["preprocess", "--input", str(raw), "--out", str(tmp_path / "s")] + argv)
    except SystemExit as exc:  # argparse's own validation exits 2 with a usage line
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_input_folder_and_empty_folder(tmp_path, capsys):
    assert main(["preprocess", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no recordings found" in capsys.readouterr().err


def _bomb_nifti(path, volumes: int) -> None:
    """A .nii.gz whose header declares `volumes` volumes of a 4 x 4 x 4 grid, holding 10."""
    hdr = nib.Nifti2Header()  # NIfTI-1 cannot declare more than 32,767 volumes
    hdr.set_data_shape((4, 4, 4, volumes))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([8.0, 8.0, 8.0, 1.0]), code=4)
    hdr.set_zooms((8.0, 8.0, 8.0, 0.735))
    body = np.ones((10, 4, 4, 4), np.float32).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + body)


def test_bounded_parsers_refuse_before_the_work(tmp_path, atlas, painter, atlas_spec, capsys,
                                                monkeypatch):
    """Inputs that declare far more than they can hold, or more than any recording needs, are
    named from their headers before anything is decompressed or parsed; the others go on."""
    import time

    raw = tmp_path / "raw"
    for i in range(3):
        _good(atlas, painter, raw, f"sub-{i}", seed=i)
    (raw / "sub-bomb" / "func").mkdir(parents=True)
    _bomb_nifti(raw / "sub-bomb" / "func" / "sub-bomb_task-rest_bold.nii.gz", 1_000_000)
    (raw / "sub-long" / "func").mkdir(parents=True)
    _bomb_nifti(raw / "sub-long" / "func" / "sub-long_task-rest_bold.nii.gz", 5000)
    deep = raw / "sub-deep" / "func"
    deep.mkdir(parents=True)
    shutil.copy(_good(atlas, painter, tmp_path / "spare", "sub-deep", seed=9),
                deep / "sub-deep_task-rest_bold.nii.gz")
    (deep / "sub-deep_task-rest_bold.json").write_text("[" * 200_000 + "]" * 200_000)
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "sub-wide_task-rest_timeseries.tsv").write_text("\t".join(["1"] * 300_000) + "\n")
    np.save(wide / "sub-huge_task-rest_timeseries.npy", np.zeros((1, 200_001), np.float32))
    start = time.monotonic()
    code = main(["preprocess", "--input", str(raw), "--out", str(tmp_path / "s"),
                 "--window", "50", "--atlas", atlas_spec, "--no-progress", "--cache-dir",
                 str(tmp_path / "c")])  # the TR from headers and sidecars
    assert code == 0 and time.monotonic() - start < 120
    out = capsys.readouterr().out
    assert "1,000,000 volumes declared, more than the bound of 100,000" in out
    assert "more than a gzip file of" in out  # 5,000 volumes declared, 10 held
    assert "nested deeper than the JSON parser can follow" in out
    manifest = BrainStore(tmp_path / "s").manifest
    assert sorted(manifest[manifest["status"] == "ok"]["subject"]) == ["sub-0", "sub-1", "sub-2"]
    code = main(["preprocess", "--input", str(raw / "sub-0"), str(wide), "--out",
                 str(tmp_path / "w"), "--window", "50", "--atlas", atlas_spec, "--input-tr",
                 "0.735", "--no-progress", "--split", "1,0,0"])
    assert code == 0 and time.monotonic() - start < 120
    out = capsys.readouterr().out
    assert "300,000 columns on its first line" in out
    assert "declares an array of shape (1, 200001)" in out
    monkeypatch.setenv("BRAINLM_MAX_VOLUMES", "20")  # the bound is the user's to move
    code = main(["preprocess", "--input", str(raw / "sub-0"), "--out", str(tmp_path / "t"),
                 "--window", "50", "--atlas", atlas_spec, "--no-progress", "--cache-dir",
                 str(tmp_path / "fresh")])
    assert code != 0 and "more than the bound of 20 (set BRAINLM_MAX_VOLUMES" in \
        capsys.readouterr().out


def test_a_yaml_alias_bomb_in_params_is_refused_at_once(tmp_path):
    import time

    from brainlm.errors import ConfigError
    from brainlm.jobs import load_params

    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "params.yaml").write_text("\n".join(lines + ["profile: a8"]) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"aliases expand to 1,[\d,]{11} values, more than"):
        load_params(tmp_path / "params.yaml")
    assert time.monotonic() - start < 5
    shared = "base: &base {epochs: 3, lr: 0.001}\nprofile: p\np: {finetune: *base}\n"
    (tmp_path / "params.yaml").write_text(shared)  # an anchor used as users do: fine
    assert load_params(tmp_path / "params.yaml")["finetune"] == {"epochs": 3, "lr": 0.001}
