"""Faults a user can cause, each ending in one named message (and nothing lost or
half-written): the classes of the README's "Faults and bad input" table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import age_effect_setup

P, T = 10, 80


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Parcellated tables, their store and an untrained tiny model (tests.helpers)."""
    return age_effect_setup(tmp_path_factory.mktemp("faults"), 12, T, P)


def _pretrain_args(root: Path, out: Path) -> list[str]:
    return ["pretrain", "--data", str(root / "store"), "--out", str(out), "--window", "40",
            "--patch-size", "10", "--batch-size", "4", "--windows-per-recording", "1",
            "--workers", "0", "--eval-every", "2", "--ckpt-every", "2", "--no-progress"]


# ------------------------------------------------------------------------------- tracking

def test_a_dead_tracking_server_is_named_before_any_work(project, tmp_path, capsys,
                                                         monkeypatch):
    from brainlm.cli import main
    from tests.services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.monotonic()
    assert main(_pretrain_args(project, tmp_path / "m") + ["--max-steps", "2"]) == 2
    assert time.monotonic() - start < 15  # refused at once, not after MLflow's retries
    assert f"tracking server {dead} is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "m" / "checkpoints").exists()  # no step was trained


def test_a_tracking_failure_mid_run_keeps_the_model(project, tmp_path, monkeypatch, capsys):
    """The store breaks after the run started: a warning, and the model is written."""
    from mlflow.tracking import MlflowClient

    from brainlm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def broken(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    assert main(_pretrain_args(project, tmp_path / "m") + ["--max-steps", "2"]) == 0
    assert "the run goes on untracked" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["step"] == 2


def test_several_processes_create_one_sqlite_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = ("import sys; from brainlm.tracking import Tracker; "
            "t = Tracker('race', run_name=sys.argv[1], uri=sys.argv[2]); t.end()")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"r{i}", uri],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r0", "r1", "r2", "r3"]


# ------------------------------------------------------------------ resume and checkpoints

def test_resume_with_other_settings_is_refused_with_the_differences(project, tmp_path, capsys):
    from brainlm.cli import main

    args = _pretrain_args(project, tmp_path / "m") + ["--max-steps", "4"]
    assert main(args + ["--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--mask-ratio", "0.5", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--resume with other settings than the checkpoint's" in err
    assert "mask_ratio: 0.75 in the checkpoint, 0.5 now" in err
    assert "batch_size: 4 in the checkpoint, 2 now" in err
    assert main(args + ["--resume"]) == 0  # the same settings continue


def test_a_corrupt_last_checkpoint_resumes_from_the_previous_one(project, tmp_path, capsys):
    from brainlm.cli import main

    args = _pretrain_args(project, tmp_path / "m") + ["--max-steps", "6", "--eval-every", "6"]
    assert main(args + ["--stop-after", "4"]) == 0  # checkpoints at steps 2 and 4
    ckpt = tmp_path / "m" / "checkpoints"
    assert (ckpt / "previous.pt").is_file()
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert re.search(r"last\.pt: not a readable checkpoint .*; resuming from .*previous\.pt "
                     r"\(step 2\)", capsys.readouterr().err)
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7))  # steps 3-4 were trained again
    (ckpt / "last.pt").unlink()  # killed between the two renames: previous.pt alone
    capsys.readouterr()
    assert main(args + ["--max-steps", "8", "--resume"]) == 2  # found, and its settings kept
    assert "max_steps: 6 in the checkpoint, 8 now" in capsys.readouterr().err
    (ckpt / "last.pt").write_bytes(b"")
    (ckpt / "previous.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert f"{ckpt / 'previous.pt'}: not a readable checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------ inputs that steer

def test_a_split_value_that_is_not_train_val_or_test_is_refused(project, tmp_path, capsys):
    from brainlm.cli import main

    table = pd.read_csv(project / "raw" / "participants.tsv", sep="\t")
    table["split"] = ["training"] + [""] * (len(table) - 1)
    bad = tmp_path / "participants.tsv"
    table.to_csv(bad, sep="\t", index=False)
    assert main(["preprocess", "--input", str(project / "raw"), "--participants", str(bad),
                 "--coords", str(project / "coords.tsv"), "--input-tr", "0.735", "--out",
                 str(tmp_path / "store"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: column 'split' must be one of train, val, test" in err
    assert "sub-00 'training'" in err and not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- concurrency

def test_a_second_writer_to_the_same_output_is_refused(project, tmp_path, capsys):
    """While one process holds an output folder, another `preprocess` into it is refused
    with the holder named, and the first one's output stays as it was."""
    from brainlm.cli import main

    out = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from brainlm.fileio import exclusive\n"
         "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["preprocess", "--input", str(project / "raw"), "--coords",
                     str(project / "coords.tsv"), "--input-tr", "0.735", "--out", str(out),
                     "--cache-dir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by pid {holder.pid}" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["preprocess", "--input", str(project / "raw"), "--coords",
                 str(project / "coords.tsv"), "--input-tr", "0.735", "--out", str(out),
                 "--window", "40", "--cache-dir", str(tmp_path / "c")]) == 0  # lock died
    assert (out / "store.json").is_file()


def test_writers_with_different_user_caches_share_the_lock(tmp_path, monkeypatch):
    """The lock lives beside the output, keyed by its real path: a second writer with another
    BRAINLM_CACHE_DIR, or reaching the output through a linked folder, is still refused."""
    from brainlm.errors import ConfigError
    from brainlm.fileio import exclusive

    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from brainlm.fileio import exclusive\n"
         "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path / "real" / "store")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "BRAINLM_CACHE_DIR": str(tmp_path / "cache-a")})
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache-b"))
        with pytest.raises(ConfigError, match=f"is being written by pid {holder.pid}"):
            with exclusive(tmp_path / "alias" / "store"):
                pass
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------ atlas

def test_a424_found_once_is_found_again_without_the_variable(monkeypatch, tmp_path):
    """A424 from BRAINLM_ATLAS_DIR is remembered in the user cache (sha256-checked), so a
    worker or shell started without the variable uses the same atlas, not the fallback; a
    file whose hash is not the pinned one is never copied."""
    import hashlib

    from brainlm import atlas

    given = tmp_path / "given"
    given.mkdir()
    files = {}
    for name, content in (("labels.nii.gz", b"labels"), ("coords.dat", b"coords")):
        (given / name).write_bytes(content)
        files[name] = ("https://unused", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(atlas, "A424_FILES", files)
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(given))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))
    assert atlas.find_a424(download=False) == given
    monkeypatch.delenv("BRAINLM_ATLAS_DIR")
    assert atlas.find_a424(download=False) == tmp_path / "cache" / "atlases" / "A424"

    files["coords.dat"] = ("https://unused", "0" * 64)  # a tampered copy: not remembered
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(given))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "other"))
    atlas.find_a424(download=False)
    assert not (tmp_path / "other" / "atlases" / "A424" / "coords.dat").exists()


def test_a_new_wave_never_switches_the_atlas_under_the_data(tmp_path, capsys):
    """The nightly's new wave on another atlas than the cohort it replaces is refused."""
    from brainlm.cli import main

    data = tmp_path / "data"
    base = ["synth", "--out", str(data), "--subjects", "4", "--timepoints", "30",
            "--voxel-size", "8"]
    assert main(base) == 0
    truth = json.loads((data / "ground_truth.json").read_text())
    truth["atlas"] = {"name": "another", "hash": "0123456789abcdef"}
    (data / "ground_truth.json").write_text(json.dumps(truth))
    capsys.readouterr()
    assert main(base + ["--wave", "1"]) == 2
    assert "was made on atlas another (0123456789abcdef)" in capsys.readouterr().err
    assert not (data / "participants.tsv").read_text().count("sub-w1")  # nothing replaced


@pytest.mark.parametrize("layout", ["header", "name-first", "index-csv", "whitespace",
                                    "names-last"])
def test_coordinate_files_in_the_usual_layouts_give_the_same_parcels(tmp_path, layout):
    from brainlm.atlas import atlas_from_coords

    xyz = np.array([[-40.5, 20, 10], [40.5, 20, 10], [0, -60, 30]])
    rows = {
        "header": ["x\ty\tz"] + ["\t".join(map(str, r)) for r in xyz],
        "name-first": ["name x y z"] + [f"p{i} {r[0]} {r[1]} {r[2]}" for i, r in enumerate(xyz)],
        "index-csv": ["index,x,y,z"] + [f"{i + 1},{r[0]},{r[1]},{r[2]}" for i, r in
                                        enumerate(xyz)],
        "whitespace": [f"  {r[0]}   {r[1]}  {r[2]}" for r in xyz],
        "names-last": [f"{i + 1}\t{r[0]}\t{r[1]}\t{r[2]}\tp{i}" for i, r in enumerate(xyz)],
    }[layout]
    path = tmp_path / "coords.txt"
    path.write_text("\n".join(rows) + "\n")
    got = atlas_from_coords(path)
    np.testing.assert_allclose(got.coords, xyz)
    assert list(got.label_values) == [1, 2, 3] and got.n_parcels == 3
    assert got.names in ([], ["p0", "p1", "p2"])


def test_a_coordinates_file_that_cannot_be_parcels_is_named(tmp_path):
    from brainlm.atlas import atlas_from_coords
    from brainlm.errors import InputError

    for text, message in (("a b c\n1 2 3\n", r"header \['a', 'b', 'c'\] has no x, y and z"),
                          ("1 2\n3 4\n", "expected rows of x, y, z"),
                          ("x y z\n1 2 3\n4 nan 6\n", "row 2: x, y, z must be finite")):
        path = tmp_path / "c.tsv"
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            atlas_from_coords(path)


def test_parcellated_tables_need_no_atlas_image_even_offline(project, tmp_path, monkeypatch):
    from brainlm import atlas
    from brainlm.cli import main

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(atlas, "_download", offline)
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["preprocess", "--input", str(project / "raw"), "--coords",
                 str(project / "coords.tsv"), "--input-tr", "0.735", "--window", "40",
                 "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "store" / "store.json").read_text())["n_parcels"] == P


# ------------------------------------------------------------------------------- evaluation

def test_evaluate_names_a_malformed_run_folder(tmp_path, capsys):
    from brainlm.cli import main

    run = tmp_path / "run"
    run.mkdir()
    for text, message in (("", "not a fine-tuning run"),
                          ('{"config": {"task": "regression"}}', "missing store, window")):
        (run / "finetune.json").write_text(text)
        assert main(["evaluate", "--run", str(run)]) == 2
        assert message in capsys.readouterr().err


def test_a_baseline_that_cannot_be_fitted_is_skipped_and_the_model_still_reported(
        project, tmp_path, capsys, monkeypatch):
    from brainlm.cli import main
    from brainlm.evaluate import baselines

    assert main(["finetune", "--model", str(project / "model"), "--data",
                 str(project / "store"), "--out", str(tmp_path / "run"), "--target", "age",
                 "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0

    def cannot(self, *args, **kwargs):
        raise ValueError("n_samples=1 is too few for 5 folds")

    monkeypatch.setattr(baselines.FCBaseline, "fit", cannot)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--n-boot", "20"]) == 0
    assert "baseline fc_linear skipped" in capsys.readouterr().err
    rows = json.loads((tmp_path / "run" / "evaluation" / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert "brainlm" in methods and "fc_linear" not in methods and "train_mean" in methods


def test_a_killed_preprocess_never_leaves_a_half_written_store(project, tmp_path):
    """kill -9 at several moments of a run that replaces a store: the store is always the old
    one or the new one, whole; the next run cleans up what the killed one left."""
    out = tmp_path / "store"
    args = [sys.executable, "-m", "brainlm.cli", "preprocess", "--input", str(project / "raw"),
            "--coords", str(project / "coords.tsv"), "--input-tr", "0.735", "--window", "40",
            "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert subprocess.run(args, capture_output=True).returncode == 0
    whole = sorted(p.name for p in out.iterdir())
    for delay in (0.5, 1.5, 2.5, 3.5):
        proc = subprocess.Popen(args + ["--seed", "1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if out.exists():  # else: killed between the two renames, recovered below
            assert sorted(p.name for p in out.iterdir()) == whole
            assert json.loads((out / "store.json").read_text())["n_parcels"] == P
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["c", "store"]  # nothing left over
    assert sorted(p.name for p in out.iterdir()) == whole


@pytest.mark.parametrize("text, message", [
    ("1,2,3\n4,5,6\n\n7,8,9\n", "line 3 is empty"),
    ("1,2,3\n4,5\n7,8,9\n", "line 2 has 2 fields, not 3"),
])
def test_a_table_line_that_is_not_a_whole_timepoint_is_named(tmp_path, text, message):
    from brainlm.data.tables import read_timeseries_table
    from brainlm.errors import InputError

    path = tmp_path / "sub-01_timeseries.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_timeseries_table(path, 3)
    path.write_text("x,y,z\n1,2,3\n4,5,6\n\n\n")  # a header and trailing blank lines: fine
    signals, _ = read_timeseries_table(path, 3)
    assert signals.shape == (3, 2)
    import gzip

    packed = tmp_path / "sub-01_timeseries.tsv.gz"  # compressed, tab-separated
    packed.write_bytes(gzip.compress(b"1.5\t2\t3\n4\t5\t6\n"))
    np.testing.assert_array_equal(read_timeseries_table(packed, 3)[0],
                                  [[1.5, 4], [2, 5], [3, 6]])
    path.write_text("1,2,3\n4,5,6\n7,8,9\n")  # a first line 1..C: labels, and it says so
    with pytest.warns(UserWarning, match="first line 1 2 3 read as column labels"):
        assert read_timeseries_table(path, 3)[0].shape == (3, 2)


def test_bids_labels_are_never_cut_short_or_altered(tmp_path):
    """sub-01-02 is not sub-01: a label with characters BIDS does not allow is quarantined
    with the label named; the others go on, ids as written."""
    from brainlm.data.ingest import discover

    import nibabel as nib

    for name in ("sub-01-02_task-rest_timeseries.npy", "sub-01_task-rest.2_timeseries.npy",
                 "sub-03_task-rest_timeseries.npy"):
        np.save(tmp_path / name, np.zeros((50, 3)))
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 5), np.float32), np.eye(4)),
             tmp_path / "sub-04_task-rest.nii.gz")
    found = {r.path.name: r for r in discover([tmp_path])}
    assert "'sub-01-02'" in found["sub-01-02_task-rest_timeseries.npy"].problem
    assert "'task-rest.2'" in found["sub-01_task-rest.2_timeseries.npy"].problem
    good = found["sub-03_task-rest_timeseries.npy"]
    assert good.problem is None and good.subject == "sub-03" and good.task == "rest"
    assert found["sub-04_task-rest.nii.gz"].task == "rest"  # the extension is not the label


def test_participant_ids_follow_the_bids_label_rule_and_mismatches_are_said(tmp_path):
    """An id without 'sub-' is read with it (said); an id that is no BIDS label, or empty,
    leaves its row out (line named); ids that match no recording while recordings go without
    phenotypes are said together (sub-4 is not sub-04)."""
    from brainlm.data.ingest import attach_phenotypes, discover

    for i in range(6):
        np.save(tmp_path / f"sub-0{i}_task-rest_timeseries.npy", np.zeros((50, 3)))
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tage\n00\t30\nsub-01\t31\nsub-0 2\t32\n\t33\nsub-03\t34\n"
        "sub-4\t35\nsub-5\t36\n")
    recordings = discover([tmp_path])
    said = attach_phenotypes(recordings, tmp_path / "participants.tsv")
    ages = {r.subject: r.phenotypes.get("age") for r in recordings}
    assert ages == {"sub-00": 30, "sub-01": 31, "sub-02": None, "sub-03": 34, "sub-04": None,
                    "sub-05": None}
    text = "\n".join(said)
    assert "2 participant_id match no recording (sub-4, sub-5)" in said[0]
    assert "(00 as sub-00)" in text
    assert "2 row(s) left out, participant_id not a BIDS label" in text
    assert "line 4 'sub-0 2'" in text and "line 5 nan" in text
    (tmp_path / "participants.tsv").write_text("participant_id\tage\n00\t30\n0 2\t32\n")
    said = "\n".join(attach_phenotypes(discover([tmp_path]), tmp_path / "participants.tsv"))
    assert "1 participant_id without the 'sub-' prefix read with it (00 as sub-00)" in said
    assert "line 3 '0 2'" in said  # left out, not also said to be read with the prefix


_KILL_AT = r'''
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace
from brainlm import fileio

point, out = sys.argv[1], Path(sys.argv[2]).resolve()


def dying(name, real):
    """kill -9 this process where `name` is about to act on the output (its own writes
    never reach the disk)."""
    def call(*args, **kwargs):
        src = Path(args[0]).resolve()
        dst = Path(args[1]).resolve() if name == "replace" else None
        if (point, name) in {("aside", "replace"), ("stored", "chmod")} and src == out or \
                (point, name) == ("swap", "replace") and dst == out:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call


fileio.os = SimpleNamespace(**{**vars(os), "replace": dying("replace", os.replace),
                               "chmod": dying("chmod", os.chmod)})
'''


def _tree(folder: Path) -> dict:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _killed_at_each_point(base: Path, script: str, tmp_path: Path, name: str) -> dict:
    """A copy of the output `base` per kill point, rewritten by `script` (killed -9 there),
    then locked as the next writer does first: {point: the output}, with no leftovers."""
    import shutil

    from brainlm.fileio import exclusive

    procs = {}
    for point in ("aside", "swap", "stored"):
        out = tmp_path / point / name
        shutil.copytree(base, out)
        procs[point] = subprocess.Popen([sys.executable, "-c", script, point, str(out)],
                                        stderr=subprocess.PIPE, text=True)
    outs = {}
    for point, proc in procs.items():
        assert proc.wait() == -9, (point, proc.stderr.read())
        out = outs[point] = tmp_path / point / name
        with exclusive(out):  # what the next writer of `out` does first
            pass
        left = sorted(p.name for p in out.parent.iterdir() if p.suffix != ".lock")
        assert left == [name], point  # no leftovers
    return outs


def test_a_killed_finetune_leaves_the_previous_run_whole_or_the_new_one(project, tmp_path):
    """kill -9 at each moment the run folder changes hands (before the old run is moved aside,
    between the two renames, after the new one is in place): the folder is always one whole
    run, never a mix; the next writer (holding the lock) clears what the killed one left."""
    from brainlm.train.config import FinetuneConfig
    from brainlm.train.finetune import finetune

    base = tmp_path / "base"
    finetune(FinetuneConfig(model=project / "model", data=project / "store", out=base,
                            target="age", epochs=1, batch_size=8, progress=False))
    old = _tree(base)
    assert {"finetune.json", "config.json", "model.safetensors", "scaler.safetensors",
            "predictions.parquet"} <= set(old)
    script = _KILL_AT + (
        "from brainlm.train.config import FinetuneConfig\n"
        "from brainlm.train.finetune import finetune\n"
        f"finetune(FinetuneConfig(model={str(project / 'model')!r}, "
        f"data={str(project / 'store')!r}, out=out, target='age', epochs=2, batch_size=8, "
        "seed=1, progress=False))\n")
    for point, out in _killed_at_each_point(base, script, tmp_path, "run").items():
        meta = json.loads((out / "finetune.json").read_text())
        if point == "stored":  # killed after the swap: the new run, whole
            assert meta["config"]["seed"] == 1 and meta["epochs_run"] == 2
            assert set(_tree(out)) == set(old)
        else:
            assert _tree(out) == old, point


def test_a_killed_pretrain_leaves_the_previous_model_whole_or_the_new_one(project, tmp_path):
    """kill -9 as pretrain's finished folder changes hands: always one whole model (weights,
    card, metrics, history and checkpoints of one run), never new weights beside an old card."""
    from brainlm.cli import main

    base = tmp_path / "base"
    assert main(_pretrain_args(project, base) + ["--max-steps", "2"]) == 0
    old = _tree(base)
    assert {"config.json", "model.safetensors", "README.md", "metrics.json",
            "checkpoints/last.pt"} <= set(old)
    script = _KILL_AT + (
        "from brainlm.cli import main\n"
        f"main({_pretrain_args(project, Path('OUT'))!r}".replace("'OUT'", "str(out)")
        + " + ['--max-steps', '4'])\n")
    for point, out in _killed_at_each_point(base, script, tmp_path, "m").items():
        metrics = json.loads((out / "metrics.json").read_text())
        tree = _tree(out)
        if point == "stored":  # the new model, whole: its card and checkpoint are step 4's
            assert metrics["step"] == 4 and set(old) <= set(tree)
            assert tree["model.safetensors"] != old["model.safetensors"]
        else:  # the old model whole, its checkpoints as the killed run left them (step 4)
            assert metrics["step"] == 2, point
            assert {k: v for k, v in tree.items() if not k.startswith("checkpoints/")} == \
                {k: v for k, v in old.items() if not k.startswith("checkpoints/")}, point


@pytest.mark.parametrize("planted", ["config.json", "model.safetensors", "scaler.safetensors",
                                     "checkpoints/last.pt", "checkpoints"])
def test_pretrain_never_writes_through_a_link_planted_in_its_folder(project, tmp_path, planted):
    """A link in the model folder (to a file or folder elsewhere) is replaced or refused by
    name; its target is never written."""
    from brainlm.cli import main

    out = tmp_path / "m"
    assert main(_pretrain_args(project, out) + ["--max-steps", "2"]) == 0
    victim = tmp_path / "victim"
    if planted == "checkpoints":
        victim.mkdir()
        shutil_rm(out / "checkpoints")
    else:
        victim.write_bytes(b"precious")
        (out / planted).unlink()
    (out / planted).symlink_to(victim)
    code = main(_pretrain_args(project, out) + ["--max-steps", "2"])
    if planted == "checkpoints":  # training would write its checkpoints into the target
        assert code == 2 and list(victim.iterdir()) == []
    else:
        assert code == 0 and victim.read_bytes() == b"precious"
        assert not (out / planted).is_symlink()


def shutil_rm(path):
    import shutil

    shutil.rmtree(path)


class _Killed(BaseException):
    """What a kill -9 leaves: the process stops between two calls and no handler runs (not an
    Exception, so nothing on the way catches it)."""


def test_a_register_killed_at_any_registry_write_is_decided_by_the_next(tmp_path, monkeypatch):
    """A sequence of candidates (first, worse, better, below its baseline) registered with a
    stop before each registry write in turn, the interrupted one registered again as the next
    `brainlm stage register` would: every version ends with the uninterrupted decision, the
    same champion and challenger, and no candidate is registered twice."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from brainlm import promotion, registry
    from brainlm.jobs.register import Candidate, _candidate, _decide

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri() if mlflow.tracking._tracking_service.utils \
        .is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    left, writes = {"writes": None}, []
    for method in ("create_registered_model", "create_model_version", "set_model_version_tag",
                   "set_registered_model_alias", "delete_registered_model_alias"):
        def write(self, *args, _real=getattr(MlflowClient, method), _method=method, **kwargs):
            writes.append((_method, args[2] if _method == "set_model_version_tag" else None))
            if left["writes"] is not None:
                left["writes"] -= 1
                if left["writes"] < 0:
                    raise _Killed
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(MlflowClient, method, write)

    def register(name, fp, value, baseline):  # one candidate, as the register job does it
        def log():
            try:
                client.create_registered_model(name)
            except MlflowException:
                pass  # exists
            return client.create_model_version(name, source=(tmp_path / fp).as_uri(),
                                               tags={registry.FINGERPRINT: fp})
        gain = value - baseline
        floor = {"name": "base", "value": gain, "low": gain - 0.05, "high": gain + 0.05,
                 "verdict": "better" if gain > 0.05 else "worse"}
        scores = promotion.subject_scores({f"sub-{i}": value + 0.01 * i for i in range(-4, 5)})
        return _decide(name, fp, log, lambda v: _candidate(
            name, v, Candidate("r2", value, True, "split", scores, floor), True))

    candidates = [("a", 0.3, 0.1), ("b", 0.2, 0.1), ("c", 0.5, 0.1), ("d", 0.6, 0.9)]

    def outcome(name):
        versions = client.search_model_versions(f"name = '{name}'")
        aliases = {a: str(client.get_model_version_by_alias(name, a).version)
                   for a in ("champion", "challenger")}
        by_fp = {v.tags[registry.FINGERPRINT]: v for v in versions}
        assert len(by_fp) == len(versions)  # never registered twice
        return aliases, {fp: (v.tags.get(registry.DECISION), str(v.version))
                         for fp, v in by_fp.items()}

    try:
        left["writes"] = 10_000
        said = [register("ref", *c)["decision"] for c in candidates]
        left["writes"] = None
        assert said == ["promoted", "kept_champion", "promoted", "below_baseline"]
        expected = outcome("ref")
        # a stop before any write; a stop inside a run of tags that only record the score
        # leaves the state of a stop before the run's first one, so those are tried once
        scores = [m == "set_model_version_tag" and key != registry.DECISION for m, key in writes]
        points = [k for k in range(len(writes)) if not (k and scores[k] and scores[k - 1])]
        assert len(points) >= 4 * len(candidates)
        for k in points:  # stopped before write k, then the next run
            name = f"killed-{k}"
            left["writes"] = k
            decisions = []
            for c in candidates:
                try:
                    decisions.append(register(name, *c)["decision"])
                except _Killed:
                    left["writes"] = None
                    decisions.append(register(name, *c)["decision"])
            assert decisions == said, k
            assert outcome(name) == expected, k
    finally:
        mlflow.set_tracking_uri(previous)


# ------------------------------------------------------------------------------ discovery

def test_discovery_never_drops_or_swaps_a_recording_unsaid(tmp_path):
    """A macOS ._ file or a sourcedata/ copy never takes a recording's place; a linked subject
    folder is read (a link back up the tree once); runs told apart by dir-/echo- are two runs;
    what looks like a recording but cannot be read is returned with its problem; a folder and
    a file name that disagree on the subject are named; a file listed twice is read once."""
    from brainlm.data.ingest import discover

    root, elsewhere = tmp_path / "bids", tmp_path / "elsewhere"

    def touch(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return path

    first = touch(root / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    touch(root / "sub-01/func/._sub-01_task-rest_bold.nii.gz")  # macOS AppleDouble junk
    touch(root / "sourcedata/sub-01/func/sub-01_task-rest_bold.nii.gz")
    touch(elsewhere / "sub-02/func/sub-02_task-rest_bold.nii.gz")
    (root / "sub-02").symlink_to(elsewhere / "sub-02", target_is_directory=True)
    (elsewhere / "sub-02/func/up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "sub-03/func").mkdir(parents=True)
    (root / "sub-03/func/sub-03_task-rest_bold.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (root / "sub-04/func/sub-04_task-rest_bold.nii.gz").mkdir(parents=True)
    touch(root / "sub-05/func/sub-05_task-rest_bold.NII.GZ")
    touch(root / "sub-06/func/sub-06_task-rest_dir-AP_bold.nii.gz")
    touch(root / "sub-06/func/sub-06_task-rest_dir-PA_bold.nii.gz")
    touch(root / "sub-07/func/sub-08_task-rest_bold.nii.gz")
    touch(root / "sub-09/func/sub-09_task-rest_timeseries.parquet")
    found = {str(r.path.relative_to(tmp_path)): r.problem for r in discover([root, first])}
    assert found == {
        "bids/sub-01/func/sub-01_task-rest_bold.nii.gz": None,
        "bids/sub-02/func/sub-02_task-rest_bold.nii.gz": None,
        "bids/sub-03/func/sub-03_task-rest_bold.nii.gz":
            "a broken symbolic link (or not a regular file)",
        "bids/sub-04/func/sub-04_task-rest_bold.nii.gz":
            "a folder named like a recording, not a file",
        "bids/sub-05/func/sub-05_task-rest_bold.NII.GZ":
            "an upper-case extension: rename it with a lower-case one (.nii.gz, .tsv)",
        "bids/sub-06/func/sub-06_task-rest_dir-AP_bold.nii.gz": None,
        "bids/sub-06/func/sub-06_task-rest_dir-PA_bold.nii.gz": None,
        "bids/sub-07/func/sub-08_task-rest_bold.nii.gz":
            "the folder says sub-07, the file name sub-08: which is it? (rename one)",
        "bids/sub-09/func/sub-09_task-rest_timeseries.parquet":
            "a table format that is not read: save it as .tsv, .csv or .npy (time x parcels)",
    }


# ---------------------------------------------------------------- outputs, stores, options

def test_an_output_or_cache_that_cannot_be_written_is_named_before_any_work(
        project, tmp_path, capsys, monkeypatch):
    from brainlm.cli import main

    (tmp_path / "afile").write_text("x")
    args = ["preprocess", "--input", str(project / "raw"), "--coords", str(project / "coords.tsv"),
            "--input-tr", "0.735", "--window", "40", "--cache-dir", str(tmp_path / "c")]
    assert main(args + ["--out", str(tmp_path / "afile" / "store")]) == 2
    err = capsys.readouterr().err
    assert f"the output {tmp_path / 'afile' / 'store'} cannot be written" in err, err
    assert not (tmp_path / "c").exists()  # refused before any recording was read
    assert main(args[:-1] + [str(tmp_path / "afile"), "--out", str(tmp_path / "s")]) == 2
    assert "the parcellation cache (--cache-dir, else the user cache)" in capsys.readouterr().err
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "afile"))  # the lock needs no cache
    assert main(args + ["--out", str(tmp_path / "s2"), "--split", "1,0,0"]) == 0
    monkeypatch.undo()
    assert main(args + ["--out", str(tmp_path / "s"), "--split", "nan,0.5,0.5"]) == 2
    assert "split fractions (nan, 0.5, 0.5) must be" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "train.npy").write_bytes((s / "train.npy").read_bytes()[:200]),
     "train.npy: damaged store file"),
    (lambda s: (s / "val.npy").unlink(), "val.npy: damaged store file (FileNotFoundError"),
    (lambda s: (s / "store.json").write_text("{"), "store.json: damaged store file"),
    (lambda s: (s / "manifest.parquet").write_bytes(b"PAR1"), "manifest.parquet: damaged"),
])
def test_a_damaged_store_is_named_with_the_file_at_fault(project, tmp_path, capsys, damage,
                                                         message):
    import shutil

    from brainlm.cli import main

    store = tmp_path / "store"
    shutil.copytree(project / "store", store)
    damage(store)
    assert main(["validate", "--data", str(store), "--window", "40"]) == 2
    err = capsys.readouterr().err
    assert message in err and "brainlm preprocess" in err, err


# -------------------------------------------------- models, runs and what they were made from

def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json: not a model configuration"),
    (lambda m: (m / "model.safetensors").unlink(), "cannot load the model"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{"),
     "cannot load the model"),
    (lambda m: (m / "config.json").write_text((m / "config.json").read_text().replace(
        '"hidden_size": ', '"hidden_size": 2')), "cannot load the model"),
])
def test_a_model_folder_that_cannot_load_is_named(project, tmp_path, capsys, damage, message):
    from brainlm.cli import main

    model = _damaged_copy(project / "model", tmp_path / "model", damage)
    assert main(["embed", "--model", str(model), "--data", str(project / "store"), "--out",
                 str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(model) in err and "unexpected" not in err, err


@pytest.fixture(scope="module")
def finetuned(project, tmp_path_factory):
    """A probe run on a copy of the project's store and model (tests may change those)."""
    import shutil

    from brainlm.train.config import FinetuneConfig
    from brainlm.train.finetune import finetune

    root = tmp_path_factory.mktemp("ft")
    shutil.copytree(project / "store", root / "store")
    shutil.copytree(project / "model", root / "model")
    finetune(FinetuneConfig(model=root / "model", data=root / "store", out=root / "run",
                            target="age", epochs=1, batch_size=8, progress=False))
    return root


def test_a_run_refuses_a_store_rebuilt_or_an_encoder_retrained_since(finetuned, tmp_path,
                                                                     capsys):
    """A probe run keeps only its head: evaluate and predict must see the store and encoder it
    was made from, or say so (before, both went on with whatever sat at those paths)."""
    import shutil

    from brainlm.cli import main
    from brainlm.predictor import FinetunedModel

    root = tmp_path / "p"
    shutil.copytree(finetuned, root)
    meta = json.loads((root / "run" / "finetune.json").read_text())
    meta.update(store=str(root / "store"), model=str(root / "model"))
    (root / "run" / "finetune.json").write_text(json.dumps(meta))
    FinetunedModel(root / "run")  # unchanged: loads
    import pandas as pd

    manifest = pd.read_parquet(root / "store" / "manifest.parquet")
    manifest.loc[0, "age"] = 99.0  # the store written again with another phenotype
    manifest.to_parquet(root / "store" / "manifest.parquet")
    assert main(["evaluate", "--run", str(root / "run"), "--n-boot", "10"]) == 2
    assert "the store was written again since" in capsys.readouterr().err
    legacy = _legacy_copy(root / "run", root / "legacy")  # a head beside the encoder's path
    recording = [np.random.default_rng(0).normal(size=(FinetunedModel(legacy).n_parcels, 120))]
    before = FinetunedModel(root / "run").predict(recording, scaled=True)
    # a folder written before the task models still loads, and answers the same
    np.testing.assert_allclose(FinetunedModel(legacy).predict(recording, scaled=True)
                               ["prediction"], before["prediction"], rtol=1e-6)
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")  # retrained
    with pytest.raises(Exception, match="the pretrained model changed since this run"):
        FinetunedModel(legacy)
    # a run written as a whole task model carries its encoder: the retrained one is not read
    after = FinetunedModel(root / "run").predict(recording, scaled=True)
    assert after.equals(before)


def _legacy_copy(run, out):
    """The run as fine-tuning wrote it before the task models: finetuned.safetensors with the
    head alone, read on the pretrained folder finetune.json names."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out)
    state = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k.startswith("head.")},
              str(out / "finetuned.safetensors"))
    (out / "model.safetensors").unlink()
    (out / "config.json").unlink()
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "finetune.json").write_text("[]"), "not a finished fine-tuning run"),
    (lambda r: (r / "model.safetensors").write_bytes(b"junk"),
     "cannot load the fine-tuned model"),
    (lambda r: (r / "predictions.parquet").unlink(), "the run's outputs cannot be read"),
])
def test_a_damaged_run_folder_is_named(finetuned, tmp_path, capsys, damage, message):
    from brainlm.cli import main
    from brainlm.predictor import FinetunedModel

    run = _damaged_copy(finetuned / "run", tmp_path / "run", damage)
    try:
        FinetunedModel(run)
        assert main(["evaluate", "--run", str(run), "--n-boot", "10"]) == 2
        err = capsys.readouterr().err
    except Exception as exc:  # the predictor refused it first
        err = str(exc)
    assert message in err and "unexpected" not in err, err


def test_resume_on_another_store_is_refused(project, tmp_path, capsys):
    import shutil

    import pandas as pd

    from brainlm.cli import main

    store = tmp_path / "store"
    shutil.copytree(project / "store", store)
    args = _pretrain_args(project, tmp_path / "m") + ["--max-steps", "4", "--stop-after", "2"]
    args[args.index("--data") + 1] = str(store)
    assert main(args) == 0
    manifest = pd.read_parquet(store / "manifest.parquet")
    manifest.loc[0, "age"] = 1.0  # rebuilt: same path, other content
    manifest.to_parquet(store / "manifest.parquet")
    assert main(args + ["--resume"]) == 2
    assert "store (its settings, manifest and scaler)" in capsys.readouterr().err


def test_a_diverging_finetune_is_named_and_a_search_carries_on(finetuned, tmp_path, capsys,
                                                               monkeypatch):
    """NaN is never a best validation loss: a single run stops with the reason; in a search
    that trial fails and the others go on; a wrong target is one message before any trial; a
    study made for another target is refused."""
    from brainlm.cli import main

    base = ["--model", str(finetuned / "model"), "--data", str(finetuned / "store"),
            "--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main(["finetune", *base, "--out", str(tmp_path / "nan"), "--target", "age",
                 "--lr", "1e30"]) == 2
    assert "the validation loss became nan" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tune = ["tune", *base[:-1], "--storage", storage, "--n-trials", "1", "--out",
            str(tmp_path / "t")]
    assert main([*tune, "--study", "s", "--target", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no column 'nosuch'" in err and "Traceback" not in err, err
    assert main([*tune, "--study", "s", "--target", "age"]) == 0
    assert main([*tune, "--study", "s", "--target", "group", "--task", "classification"]) == 2
    assert "holds trials of another question (target 'age' there, 'group' now" in \
        capsys.readouterr().err
    from brainlm.train import hpo
    from brainlm.train.finetune import Diverged

    real, calls = hpo.finetune, []

    def first_diverges(cfg, on_epoch=None):
        calls.append(cfg.out)
        if len(calls) == 1:
            raise Diverged("the validation loss became nan at epoch 1")
        return real(cfg, on_epoch=on_epoch)

    monkeypatch.setattr(hpo, "finetune", first_diverges)
    assert main([*tune, "--study", "s2", "--target", "age", "--n-trials", "2"]) == 0
    assert "2 trials (1 complete, 0 pruned)" in capsys.readouterr().out
    monkeypatch.setattr(hpo, "finetune", lambda cfg, on_epoch=None: (_ for _ in ()).throw(
        Diverged("the validation loss became nan at epoch 1")))
    assert main([*tune, "--study", "s3", "--target", "age"]) == 2
    assert "none of its 1 trials finished" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # outputs that would replace something else
    (lambda p, f, t: ["pretrain", "--data", f"{p}/store", "--out", f"{p}/store/m"],
     "lies inside the store"),
    (lambda p, f, t: ["pretrain", "--data", f"{p}/store", "--out", f"{p}/raw"],
     "is not a pretraining output"),
    (lambda p, f, t: ["finetune", "--model", f"{f}/model", "--data", f"{f}/store", "--out",
                      f"{f}/store", "--target", "age"], "is not a fine-tuning run"),
    (lambda p, f, t: ["evaluate", "--run", f"{f}/run", "--out", f"{p}/raw"],
     "is not an evaluation"),
    (lambda p, f, t: ["predict", "--model", f"{f}/run", "--input", f"{t}/x.npy", "--out",
                      f"{t}/x.npy"], "give a .parquet file"),
    (lambda p, f, t: ["validate", "--data", f"{p}/store", "--out", f"{p}/store/v",
                      "--window", "40"], "is inside the store"),
    # options
    (lambda p, f, t: ["perturb", "--model", f"{p}/model", "--data", f"{p}/store",
                      "--recording", "x", "--parcels", "1", "--out", f"{t}/o", "--seed", "-1"],
     "--seed: -1 must be >= 0"),
    (lambda p, f, t: ["finetune", "--model", f"{f}/model", "--data", f"{f}/store", "--out",
                      f"{t}/r", "--target", "age", "--device", "tpu"],
     "--device 'tpu' must be auto, cpu, cuda"),
    (lambda p, f, t: ["embed", "--model", f"{p}/model", "--data", f"{p}/store", "--out",
                      f"{t}/e.parquet", "--window", "30"], "--window 30: "),
    (lambda p, f, t: ["preprocess", "--input", f"{p}/raw", "--coords", f"{p}/coords.tsv",
                      "--out", f"{t}/s", "--high-pass", "0.1", "--low-pass", "0.05"],
     "--high-pass 0.1 Hz must be below --low-pass 0.05 Hz"),
    (lambda p, f, t: ["analyze", "--model", f"{p}/model", "--data", f"{p}/store", "--out",
                      f"{t}/a", "--networks", "500"], "--networks 500: more networks than"),
    (lambda p, f, t: ["pretrain", "--data", f"{p}/store", "--out", f"{t}/m",
                      "--probe-target", "nosuch"], "--probe-target nosuch: no such column"),
])
def test_options_and_outputs_are_checked_before_any_work(project, finetuned, tmp_path, capsys,
                                                         argv, message):
    from brainlm.cli import main

    np.save(tmp_path / "x.npy", np.zeros((3, 3)))
    code = main([str(a) for a in argv(project, finetuned, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_a_served_window_with_nan_is_refused_not_embedded():
    from brainlm.mlflow_model import _windows

    good = np.zeros((3, 4, 10))
    assert _windows({"signal": good.tolist()}).shape == (3, 4, 10)
    bad = good.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/Inf values .* in row\(s\) \[1\]"):
        _windows({"signal": bad.tolist()})
    with pytest.raises(ValueError, match="beyond float32"):
        _windows({"signal": (good + 1e300).tolist()})


def test_network_truth_tables_are_read_by_label(project, tmp_path):
    """A truth table with a `label` column is matched by parcel label, whatever its row
    order (it was read by row order, silently wrong when shuffled)."""
    from brainlm.analysis.networks import network_labels
    from brainlm.data.store import BrainStore

    store = BrainStore(project / "store")
    labels = store.parcels["label"].astype(int).tolist()
    table = pd.DataFrame({"label": labels, "network": [f"n{v % 3}" for v in labels]})
    table.iloc[::-1].to_csv(tmp_path / "truth.tsv", sep="\t", index=False)
    np.testing.assert_array_equal(network_labels(tmp_path / "truth.tsv", store),
                                  [f"n{v % 3}" for v in labels])
    table.iloc[1:].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(Exception, match=f"no network for parcel label.* {labels[0]}"):
        network_labels(tmp_path / "short.tsv", store)
    (tmp_path / "t.json").write_text("[1, 2]")
    with pytest.raises(Exception, match="cannot read network labels \\(TypeError"):
        network_labels(tmp_path / "t.json", store)


def test_participants_tables_that_pandas_would_bend_are_named(tmp_path):
    from brainlm.data.ingest import read_participants
    from brainlm.errors import InputError

    path = tmp_path / "participants.tsv"
    path.write_text("participant_id\tage\tage\nsub-01\t30\t31\n")
    with pytest.raises(InputError, match="column 'age' appears more than once"):
        read_participants(path)  # pandas renamed the second to age.1
    path.write_text("participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\t31\n")
    with pytest.raises(InputError, match="line 3 has fewer fields than the 3 columns"):
        read_participants(path)  # pandas padded it with a missing value
    path.unlink()
    path.mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        read_participants(path)


def test_a_damaged_cache_entry_is_computed_again(project, tmp_path):
    """An edited or damaged parcellation-cache entry (NaN, transposed, JSON without its
    fields) is never trusted: the recording is parcellated again and the store is finite."""
    from brainlm.cli import main
    from brainlm.data.store import BrainStore

    args = ["preprocess", "--input", str(project / "raw"), "--coords",
            str(project / "coords.tsv"), "--input-tr", "0.735", "--window", "40",
            "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    entries = sorted((tmp_path / "c").rglob("*.npy"))
    np.save(entries[0], np.full(np.load(entries[0]).shape, np.nan, np.float32))
    np.save(entries[1], np.load(entries[1]).T.copy())
    entries[2].with_suffix(".json").write_text("{}")
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = BrainStore(tmp_path / "a"), BrainStore(tmp_path / "b")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a._array(split), b._array(split))


def test_an_in_memory_tracking_store_is_refused(tmp_path):
    from brainlm.errors import ConfigError
    from brainlm.tracking import check_reachable

    for uri in ("sqlite://", "sqlite:///"):
        with pytest.raises(ConfigError, match="runs would live in memory and be lost"):
            check_reachable(uri)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot create or open"):
        check_reachable(f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")


def test_copies_and_locks_never_write_through_a_planted_link(tmp_path, monkeypatch):
    """A link planted where a copy lands is replaced, never written through; a lock file
    that is a link is refused instead of followed."""
    from brainlm import fileio
    from brainlm.errors import ConfigError

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "out" / "scaler.safetensors"
    dest.parent.mkdir()
    dest.symlink_to(victim)
    fileio.copy_file_atomic(src, dest)
    assert victim.read_text() == "keep me"
    assert not dest.is_symlink() and dest.read_bytes() == b"payload"

    target = (tmp_path / "store").resolve()
    (tmp_path / ".store.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="a link planted there is never followed"):
        with fileio.exclusive(target):
            pass
    assert victim.read_text() == "keep me"


# ------------------------------------------------------------------- trust nothing read back

@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("encoder.blocks.0.attn.qkv.weight"), "missing encoder.blocks.0.attn.qkv"),
    (lambda s: s.__setitem__("extra.weight", s["patch_embed.weight"].clone()), "unexpected"),
    (lambda s: s["patch_embed.weight"].view(-1).__setitem__(0, float("nan")),
     "non-finite values in patch_embed.weight"),
])
def test_weights_that_do_not_fill_the_model_are_refused(project, tmp_path, damage, message):
    """A weights file that loads but does not fit (a key missing or extra) or holds NaN is
    named, instead of transformers starting the missing weights at random and embedding."""
    import shutil

    from safetensors.torch import load_file, save_file

    from brainlm.errors import ConfigError
    from brainlm.model import load_model

    folder = tmp_path / "m"
    shutil.copytree(project / "model", folder)
    state = load_file(str(folder / "model.safetensors"))
    damage(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=message):
        load_model(folder)
    load_model(project / "model")  # the untouched folder loads


def test_a_cache_entry_edited_to_other_finite_values_is_not_trusted(project, tmp_path):
    """Parcellation cache entries carry the hash of their values: one edited to other finite
    values of the same shape is computed again from the recording, not used."""
    from brainlm.data import parcellate as pc
    from brainlm.data.ingest import Recording
    from brainlm.data.parcellate import ParcellationSettings

    from tests.conftest import paint_nifti
    from brainlm.atlas import load_atlas

    atlas = load_atlas("A424", allow_fallback=True)
    rng = np.random.default_rng(0)
    path = paint_nifti(atlas, 10000 + 30 * rng.standard_normal((atlas.n_parcels, 40)),
                       tmp_path / "sub-01_bold.nii.gz", step=4)
    rec, settings = Recording(path=path, subject="sub-01"), ParcellationSettings(min_timepoints=30)
    first = pc.parcellate_recording(rec, atlas, settings, cache_dir=tmp_path / "c")
    entry = next((tmp_path / "c").rglob(f"{first.cache_key}.npy"))
    forged = np.load(entry)
    np.save(entry, (forged[::-1] * 0.5).astype(np.float32))  # same shape, finite, wrong
    again = pc.parcellate_recording(rec, atlas, settings, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.signals, first.signals)


# ------------------------------------------------------------------------------- full disk

def test_a_full_disk_under_the_store_is_one_line_naming_the_file(project, tmp_path, capsys,
                                                                 monkeypatch):
    """The store's arrays are memory-mapped: their blocks are reserved first, so a full disk
    is an error naming the file (not a bus error), the previous store stays whole and no
    temporary folder is left."""
    import errno
    import os

    from brainlm.cli import main

    args = ["preprocess", "--input", str(project / "raw"), "--out", str(tmp_path / "s"),
            "--window", "40", "--input-tr", "0.735", "--no-progress", "--coords",
            str(project / "coords.tsv"), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    before = _tree(tmp_path / "s")

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.npy: No space left on device (needs" in err and "Traceback" not in err
    assert _tree(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["c", "s"]


def test_a_checkpoint_on_a_full_disk_is_named_and_leaves_nothing(project, tmp_path, capsys,
                                                                monkeypatch):
    """torch reports a full disk as a C++ RuntimeError: pretrain says which file and how much
    space is left, and no temporary checkpoint is left filling the disk."""
    import torch

    from brainlm.cli import main

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    assert main(_pretrain_args(project, tmp_path / "m") + ["--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.pt: cannot write the checkpoint" in err and "bytes free on its disk" in err
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "m").rglob("*"))


# -------------------------------------------------------------------- one rule for outputs

@pytest.mark.parametrize("command, where", [
    ("predict", "store/manifest.parquet"),
    ("predict", "run/predictions.parquet"),
    ("predict", "model/scores.parquet"),
    ("pretrain", "store/m"),
    ("pretrain", "run/m"),
    ("finetune", "model/run"),
    ("finetune", "store/run"),
    ("preprocess", "run/store"),
    ("embed", "store/embeddings.parquet"),
    ("analyze", "model/analysis"),
    ("perturb", "run/perturb"),
])
def test_no_command_writes_inside_a_store_model_or_run(finetuned, tmp_path, capsys, command,
                                                       where):
    """Every writer refuses an --out inside a store, a model folder or a fine-tuning run (one
    shared check), before any work, and what is there is left as it was."""
    import shutil

    from brainlm.cli import main

    root = tmp_path / "p"
    shutil.copytree(finetuned, root)
    before = {name: _tree(root / name) for name in ("store", "model", "run")}
    out = root / where
    argv = {
        "predict": ["predict", "--model", str(root / "run"), "--input",
                    str(root / "raw"), "--out", str(out)],
        "pretrain": _pretrain_args(root, out) + ["--max-steps", "2"],
        "finetune": ["finetune", "--model", str(root / "model"), "--data", str(root / "store"),
                     "--target", "age", "--epochs", "1", "--out", str(out), "--no-progress"],
        "preprocess": ["preprocess", "--input", str(root / "raw"), "--out", str(out),
                       "--input-tr", "0.735", "--coords", str(root / "coords.tsv"),
                       "--no-progress"],
        "embed": ["embed", "--model", str(root / "model"), "--data", str(root / "store"),
                  "--out", str(out)],
        "analyze": ["analyze", "--model", str(root / "model"), "--data", str(root / "store"),
                    "--out", str(out)],
        "perturb": ["perturb", "--model", str(root / "model"), "--data", str(root / "store"),
                    "--recording", "sub-01", "--parcels", "1", "--out", str(out)],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} lies inside the" in err or f"--out {out} overlaps the input" in err, err
    assert {name: _tree(root / name) for name in before} == before


# -------------------------------------------------------------------------- consistent reads

def test_a_run_swapped_while_it_is_read_is_read_again_whole(finetuned, tmp_path, monkeypatch):
    """`predict` reading a run while `finetune` swaps in a new one: the folder's identity
    changes under the reader, which reads it again, so it never mixes one run's finetune.json
    with the other's weights."""
    import shutil

    from brainlm import predictor
    from brainlm.train.config import FinetuneConfig
    from brainlm.train.finetune import finetune

    root = tmp_path / "p"
    shutil.copytree(finetuned, root)
    meta = json.loads((root / "run" / "finetune.json").read_text())
    meta.update(store=str(root / "store"), model=str(root / "model"))
    (root / "run" / "finetune.json").write_text(json.dumps(meta))
    finetune(FinetuneConfig(model=root / "model", data=root / "store", out=root / "new",
                            target="age", epochs=1, batch_size=8, seed=5, progress=False,
                            pooling="mean"))
    real, swapped = predictor.read_json, []

    def swap_after_first_read(path):
        out = real(path)
        if not swapped:  # the new run takes the old one's place, as write_run does
            swapped.append(1)
            os.replace(root / "run", root / "old")
            os.replace(root / "new", root / "run")
        return out

    monkeypatch.setattr(predictor, "read_json", swap_after_first_read)
    model = predictor.FinetunedModel(root / "run")
    assert swapped and model.pooling == "mean" and model.meta["config"]["seed"] == 5
    assert model.head.linear.in_features == model.model.config.hidden_size  # the new head


def test_a_store_rebuilt_under_a_running_pretrain_is_refused(project, tmp_path, monkeypatch):
    """The model folder gets the store's scaler at the end: a store written again while the
    run trained is named, instead of giving the model the new store's scaler."""
    import shutil

    from brainlm.cli import main
    from brainlm.train import pretrain as pt

    store = tmp_path / "store"
    shutil.copytree(project / "store", store)
    real = pt.train

    def train_then_rebuild(run, tracker):
        out = real(run, tracker)
        scaler = store / "scaler.safetensors"
        scaler.write_bytes(scaler.read_bytes()[:-1] + b" ")  # another scaler, same name
        return out

    monkeypatch.setattr(pt, "train", train_then_rebuild)
    args = _pretrain_args(project, tmp_path / "m")
    args[args.index("--data") + 1] = str(store)
    assert main(args + ["--max-steps", "2"]) == 2
    assert not (tmp_path / "m" / "model.safetensors").exists()
