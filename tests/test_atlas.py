"""Atlases: A424 resolution order, pinned download, any label NIfTI, the offline fallback."""

from __future__ import annotations

import io
import warnings

import nibabel as nib
import numpy as np
import pytest

from brainlm import atlas as atlas_mod
from brainlm.atlas import FALLBACK_NAME, atlas_from_nifti, fallback_atlas, load_atlas
from brainlm.errors import ConfigError, InputError


def test_a424_from_atlas_dir(atlas, atlas_spec):
    if atlas_spec != "A424":
        pytest.skip("A424 files not available here; the fallback atlas is tested below")
    assert atlas.n_parcels == 424
    assert atlas.shape == (91, 109, 91)
    np.testing.assert_allclose(np.diag(atlas.affine)[:3], [-2, 2, 2])
    # the coordinate table is used, and it lies close to the label centroids
    centroids = atlas_mod.label_centroids(atlas.labels, atlas.affine, atlas.label_values)
    assert np.median(np.linalg.norm(centroids - atlas.coords, axis=1)) < 5
    assert atlas.names[0] == "R_V1_ROI"


def test_any_label_nifti_gets_centroids_and_names(tmp_path):
    labels = np.zeros((10, 10, 10), np.int16)
    labels[1:3, 1:3, 1:3] = 5
    labels[6:9, 6:9, 6:9] = 9
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -10, -10]
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "mini.nii.gz")
    (tmp_path / "mini.tsv").write_text("index\tname\n5\tfront\n9\tback\n")
    a = atlas_from_nifti(tmp_path / "mini.nii.gz")
    assert a.n_parcels == 2 and list(a.label_values) == [5, 9]
    np.testing.assert_allclose(a.coords[0], [-10 + 2 * 1.5] * 3)
    np.testing.assert_allclose(a.coords[1], [-10 + 2 * 7.0] * 3)
    assert a.names == ["front", "back"]
    assert load_atlas(tmp_path / "mini.nii.gz").hash == a.hash


def test_probabilistic_or_4d_atlas_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.random.rand(4, 4, 4).astype(np.float32), np.eye(4)),
             tmp_path / "prob.nii.gz")
    with pytest.raises(InputError, match="prob.nii.gz: atlas values are not integer labels"):
        atlas_from_nifti(tmp_path / "prob.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="3-D label image"):
        atlas_from_nifti(tmp_path / "4d.nii.gz")


def test_fallback_atlas_is_deterministic_symmetric_and_cached():
    a = fallback_atlas()
    assert a.n_parcels == 424 and a.name == FALLBACK_NAME
    counts = np.bincount(a.labels.ravel(), minlength=425)[1:]
    assert counts.min() > 50  # every parcel is a real region
    right, left = a.coords[:212], a.coords[212:]
    assert np.all(right[:, 0] > 0) and np.all(left[:, 0] < 0)
    mirrored = left * np.array([-1, 1, 1])
    assert np.median(np.linalg.norm(right - mirrored, axis=1)) < 4  # homologous pairs
    b = fallback_atlas()  # from the cache
    assert a.hash == b.hash
    np.testing.assert_array_equal(a.labels, b.labels)


def test_a424_missing_offline_is_a_clear_error_or_a_warned_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(atlas_mod.urllib.request, "urlopen", offline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="BRAINLM_ATLAS_DIR"):
            load_atlas("A424")
    with pytest.warns(UserWarning, match="offline generated atlas"):
        a = load_atlas("A424", allow_fallback=True)
    assert a.name == FALLBACK_NAME and a.n_parcels == 424


def test_download_checks_the_pinned_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(atlas_mod.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(b"tampered"))
    with pytest.warns(UserWarning, match="does not match the pinned"):
        assert atlas_mod.find_a424() is None
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # neither the bad file nor a temporary one is kept


def test_download_into_cache_when_content_matches(tmp_path, monkeypatch, atlas_spec):
    import os
    from pathlib import Path

    if atlas_spec != "A424":
        pytest.skip("needs the A424 files as the 'server' content")
    src = Path(os.environ["BRAINLM_ATLAS_DIR"])
    monkeypatch.setenv("BRAINLM_ATLAS_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))
    served = {url: src / name for name, (url, _) in atlas_mod.A424_FILES.items()}
    monkeypatch.setattr(atlas_mod.urllib.request, "urlopen",
                        lambda url, timeout: open(served[url], "rb"))
    folder = atlas_mod.find_a424()
    assert folder == tmp_path / "cache" / "atlases" / "A424"
    assert load_atlas("A424").n_parcels == 424


def test_the_atlas_in_use_is_said_first_and_the_fallback_loudly(capsys, monkeypatch, tmp_path):
    from brainlm.atlas import FALLBACK_NAME, announce, fallback_atlas, load_atlas

    announce(load_atlas("A424", download=False), "synth")
    assert capsys.readouterr().out.startswith("brainlm synth: atlas A424 (424 parcels, hash ")
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path))
    announce(fallback_atlas(n_parcels=20), "synth")
    out = capsys.readouterr().out
    assert f"ATLAS IS THE OFFLINE FALLBACK '{FALLBACK_NAME}', NOT A424" in out
    assert "not comparable with A424" in out and "\033[1m" not in out  # no escapes in a pipe
