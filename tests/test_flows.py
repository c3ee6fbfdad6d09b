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
    from brainlm.jobs import load_params, run_stage

    root = tmp_path_factory.mktemp("flowrepo")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    micro = {k: dict(v) for k, v in MICRO.items()}
    micro["preprocess"]["atlas"] = atlas_spec
    params.update(demo=micro, mask_ratios=[0.5], finetune_mask_ratio=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("synth", load_params(root / "params.yaml"))
    return root


def test_preprocess_flow_maps_recordings_and_caches_by_file_hash(harness, micro_repo,
                                                                 monkeypatch, tmp_path):
    from brainlm.data import pipeline
    from flows.pipeline import preprocess
    from tests.test_pipeline_reads import count_opens, opens_of

    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "cache"))  # a cold brainlm cache
    calls = []
    real = pipeline.parcellate_one
    monkeypatch.setattr(pipeline, "parcellate_one",
                        lambda plan, i, s: calls.append(i) or real(plan, i, s))
    params = str(micro_repo / "params.yaml")
    inputs = sorted((micro_repo / "data").rglob("*_bold.nii.gz"))
    assert len(inputs) == 10
    with count_opens() as opened:
        first = preprocess(params)
    n = first["recordings_kept"]
    assert n == 10 and (micro_repo / "processed" / "manifest.parquet").is_file()
    assert len(calls) == n  # one task per recording; the assembly takes what they returned
    # each file is hashed once for the task's cache key, then parcellated in one pass
    assert opens_of(opened, inputs) == {p.name: 2 for p in inputs}
    calls.clear()
    with count_opens() as opened:
        second = preprocess(params)
    assert second == first
    assert calls == []  # the tasks were cached; their parcellations come from the brainlm cache
    assert opens_of(opened, inputs) == {p.name: 1 for p in inputs}  # hashed for the key only
    assert (micro_repo / "metrics" / "preprocess.json").is_file()


def test_stage_flows_run_the_same_code_as_dvc(harness, micro_repo):
    from flows.pipeline import pretrain, validate

    params = str(micro_repo / "params.yaml")
    assert validate(params)["success"] is True
    result = pretrain(params)
    assert set(result) == {"0.5"} and "val_r2" in result["0.5"]
    assert (micro_repo / "models" / "pretrain-0.5" / "model.safetensors").is_file()
    assert Path(micro_repo / "metrics" / "pretrain-0.5.json").is_file()


# --- preprocess on Dask (prefect-dask) ------------------------------------------------------

@pytest.fixture(scope="module")
def dask_repo(tmp_path_factory, atlas_spec):
    """A cohort of its own (other seed: no task cache shared with micro_repo), 2 workers."""
    from brainlm.jobs import load_params, run_stage

    root = tmp_path_factory.mktemp("daskrepo")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    micro = {k: dict(v) for k, v in MICRO.items()}
    micro["synth"].update(subjects=6, seed=1)
    micro["preprocess"].update(atlas=atlas_spec, workers=2)
    params.update(demo=micro, mask_ratios=[0.5], finetune_mask_ratio=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("synth", load_params(root / "params.yaml"))
    return root


def _parcellate_outcomes(state) -> list[dict]:
    """What the parcellate tasks of a `preprocess` run returned (read back from Prefect)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterParentFlowRunId)

    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[f.id for f in subflows])))
    return [r.state.result() for r in runs if r.name.startswith("parcellate-")]


def _store_contents(root: Path) -> dict:
    """Every file of the store and the preprocess metrics, byte for byte."""
    files = sorted((root / "processed").iterdir()) + [root / "metrics" / "preprocess.json"]
    return {p.name: p.read_bytes() for p in files}


def test_preprocess_on_a_local_dask_cluster_writes_the_same_store(harness, dask_repo,
                                                                   monkeypatch, tmp_path):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.pipeline import preprocess

    monkeypatch.delenv("BRAINLM_DASK_ADDRESS", raising=False)
    params = str(dask_repo / "params.yaml")
    cache = tmp_path / "dask-cache"  # the flow decides it (plan.cache_dir), workers write it
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(cache))
    state = preprocess(params, dask="local", return_state=True)
    on_dask = state.result()
    outcomes = _parcellate_outcomes(state)
    assert len(outcomes) == on_dask["recordings_kept"] == 6
    assert all(o["worker"].startswith("tcp://") and o["pid"] != os.getpid() for o in outcomes)
    assert len({o["pid"] for o in outcomes}) <= 2  # the LocalCluster's 2 worker processes
    assert len(list((cache / "parcellated").rglob("*"))) > 6  # workers wrote the flow's cache
    dask_store = _store_contents(dask_repo)

    # the default thread runner, recomputing everything (fresh caches): same bytes
    monkeypatch.setenv("BRAINLM_CACHE_DIR", str(tmp_path / "thread-cache"))
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        state = preprocess(params, return_state=True)
    assert state.result() == on_dask
    assert all(o["worker"] is None and o["pid"] == os.getpid()
               for o in _parcellate_outcomes(state))
    assert _store_contents(dask_repo) == dask_store


@pytest.fixture
def external_dask(tmp_path):
    """`dask scheduler` and `dask worker` as separate processes started elsewhere, as on real
    machines: they have brainlm but not this repository's flows/ (a LocalCluster's workers
    would share our sys.path). Yields (scheduler address, worker address)."""
    import subprocess
    import sys

    from distributed import Client

    from tests.services import free_port, stop

    dask = str(Path(sys.executable).with_name("dask"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    opts = dict(cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **opts)]
    try:
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1",
                                       "--no-dashboard"], **opts))
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            (worker,) = client.scheduler_info()["workers"]
        yield address, worker
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_preprocess_on_a_running_scheduler_and_a_clear_error_without_one(
        harness, dask_repo, external_dask, monkeypatch):
    """The flow's code travels to the workers by value: a deployment loads flows/pipeline.py
    as a script named `pipeline`, which no cluster could import."""
    import importlib.util

    import dask
    from distributed import Client
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from brainlm.errors import ConfigError
    from flows.pipeline import preprocess

    address, worker = external_dask
    with Client(address, set_as_default=False) as client:
        assert client.run(importlib.util.find_spec, "flows") == {worker: None}
    params = str(dask_repo / "params.yaml")
    monkeypatch.setenv("BRAINLM_DASK_ADDRESS", address)  # dask=None: the variable decides
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        state = preprocess(params, return_state=True)
    assert state.result()["recordings_kept"] == 6
    assert {o["worker"] for o in _parcellate_outcomes(state)} == {worker}
    monkeypatch.delenv("BRAINLM_DASK_ADDRESS")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at "
                                              "'tcp://127.0.0.1:1'"):
            preprocess(params, dask="tcp://127.0.0.1:1")


def test_dask_runner_choice_and_a_clear_error_without_prefect_dask(monkeypatch):
    import sys

    from brainlm.errors import ConfigError
    from flows.pipeline import task_runner

    monkeypatch.delenv("BRAINLM_DASK_ADDRESS", raising=False)
    assert task_runner(None, 4) is None
    local = task_runner("local", 3)
    assert local.address is None and local.cluster_kwargs == {
        "n_workers": 3, "threads_per_worker": 1, "processes": True}
    monkeypatch.setenv("BRAINLM_DASK_ADDRESS", "tcp://scheduler:8786")
    assert task_runner(None).address == "tcp://scheduler:8786"
    assert task_runner("local").address is None  # the argument wins over the environment
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'brainlm\[cluster\]'"):
        task_runner("local")



def test_score_flow_predicts_a_folder_on_a_prefect_server(harness, tmp_path):
    """The `score/folder` deployment's flow on a real (temporary) Prefect server: predictions,
    the drift report and a markdown artifact; prefect.yaml's entrypoint loads it."""
    import json

    import pandas as pd
    from prefect.flows import load_flow_from_entrypoint

    from brainlm.train.finetune import FinetuneConfig, finetune
    from flows.score import score
    from tests.helpers import age_effect_setup

    root = age_effect_setup(tmp_path / "cohort", 12, 80, 10)
    finetune(FinetuneConfig(model=root / "model", data=root / "store", out=root / "run",
                            target="age", epochs=2, batch_size=8, progress=False))
    out = tmp_path / "scores" / "p.parquet"
    result = score(model=str(root / "run"), folder=str(root / "raw"), out=str(out),
                   options={"atlas": "A424", "coords": str(root / "coords.tsv"),
                            "input_tr": 0.735, "cache_dir": str(tmp_path / "cache")})
    assert result["recordings"] == 12 and result["drifted_parcels"] == []
    assert len(pd.read_parquet(out)) == 12
    assert json.loads(out.with_suffix(".report.json").read_text())["drift"]["success"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "score" and "Scored 12 recordings" in (a.data or "") for a in artifact)
    deployment = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())[
        "deployments"] if d["name"] == "folder")
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    assert flow.name == "score" and set(deployment["parameters"]) <= set(
        flow.parameters.properties)
