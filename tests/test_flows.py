"""Prefect flows: the same stages as dvc repro, with a per-recording task cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.test_dvc import MICRO, ROOT


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory, atlas_spec):
    from brainlm.stages import load_params, run_stage

    root = tmp_path_factory.mktemp("flowrepo")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    micro = {k: dict(v) for k, v in MICRO.items()}
    micro["preprocess"]["atlas"] = atlas_spec
    params.update(demo=micro, mask_ratios=[0.5], finetune_mask_ratio=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("synth", load_params(root / "params.yaml"))
    return root


def test_preprocess_flow_maps_recordings_and_caches_by_file_hash(harness, micro_repo,
                                                                 monkeypatch):
    from brainlm.data import pipeline
    from flows.pipeline import preprocess

    calls = []
    real = pipeline.parcellate_one
    monkeypatch.setattr(pipeline, "parcellate_one",
                        lambda plan, i, s: calls.append(i) or real(plan, i, s))
    params = str(micro_repo / "params.yaml")
    first = preprocess(params)
    n = first["recordings_kept"]
    assert n == 10 and (micro_repo / "processed" / "manifest.parquet").is_file()
    assert len(calls) == 2 * n  # one task per recording, then the assembly reads them back
    calls.clear()
    second = preprocess(params)
    assert second == first
    assert len(calls) == n  # the tasks were cached: only the assembly's reads remain
    assert (micro_repo / "metrics" / "preprocess.json").is_file()


def test_stage_flows_run_the_same_code_as_dvc(harness, micro_repo):
    from flows.pipeline import pretrain, validate

    params = str(micro_repo / "params.yaml")
    assert validate(params)["success"] is True
    result = pretrain(params)
    assert set(result) == {"0.5"} and "val_r2" in result["0.5"]
    assert (micro_repo / "models" / "pretrain-0.5" / "model.safetensors").is_file()
    assert Path(micro_repo / "metrics" / "pretrain-0.5.json").is_file()
