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


# --- preprocess on Dask (prefect-dask) ------------------------------------------------------

@pytest.fixture(scope="module")
def dask_repo(tmp_path_factory, atlas_spec):
    """A cohort of its own (other seed: no task cache shared with micro_repo), 2 workers."""
    from brainlm.stages import load_params, run_stage

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


def test_preprocess_on_a_running_scheduler_and_a_clear_error_without_one(harness, dask_repo,
                                                                         monkeypatch):
    import dask
    from distributed import LocalCluster
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from brainlm.errors import ConfigError
    from flows.pipeline import preprocess

    params = str(dask_repo / "params.yaml")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        workers = set(cluster.scheduler.workers)
        monkeypatch.setenv("BRAINLM_DASK_ADDRESS", cluster.scheduler_address)  # dask=None
        with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
            state = preprocess(params, return_state=True)
        assert state.result()["recordings_kept"] == 6
        assert {o["worker"] for o in _parcellate_outcomes(state)} == workers
        assert cluster.scheduler.task_prefixes  # the scheduler ran them
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


def test_the_parcellate_task_unpickles_where_flows_is_not_importable(tmp_path):
    """A cluster's scheduler and workers have brainlm but not this repository's flows/ (a
    deployment even loads flows/pipeline.py as a script named `pipeline`)."""
    import subprocess
    import sys

    import cloudpickle

    from flows.pipeline import parcellate

    code = ("import sys, cloudpickle; t = cloudpickle.loads(sys.stdin.buffer.read()); "
            "assert 'flows' not in sys.modules; print(t.name)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(parcellate),
                         cwd=tmp_path, env=env, capture_output=True)
    assert res.returncode == 0 and res.stdout.decode().strip() == "parcellate", res.stderr[-2000:]
