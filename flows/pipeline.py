"""Prefect flows over the pipeline stages: orchestration only, the work is brainlm's.

Each flow runs the same jobs (`brainlm.jobs.run_stage`) as `dvc repro` and `brainlm stage`,
tracked the same way.
`preprocess` maps one task per recording (retries; cached by the input file's hash and the
settings, so a second run skips unchanged recordings) before assembling the store; the tasks
run in threads, or on a Dask cluster through prefect-dask (`dask=`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from prefect import flow, get_run_logger, task, unmapped

from brainlm.errors import ConfigError
from brainlm.jobs import load_params, run_stage

DASK_ADDRESS_ENV = "BRAINLM_DASK_ADDRESS"


def _pickle_by_value() -> None:
    """Send this module's code to Dask by value: a deployment loads it as `pipeline` (a
    script), which a cluster's scheduler and workers cannot import; they need brainlm only."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_pickle_by_value()


def _recording_key(context, parameters) -> str | None:
    """Cache key: sha256 of the recording file + parcellation settings + atlas + TR.

    The file is hashed once per run: `plan.source_hash` keeps the hash in the task's plan,
    where the task finds it and hands it to the brainlm cache instead of hashing again. None
    (no caching) when the file cannot be read: the task then runs and says why."""
    plan, index = parameters["plan"], parameters["index"]
    source_hash = plan.source_hash(index)
    if source_hash is None:
        return None
    rec = plan.recordings[index]
    settings = json.dumps(parameters["settings"].key(), sort_keys=True)
    return hashlib.sha256(f"{source_hash}|{settings}|{plan.atlas.hash}|"
                          f"{rec.tr}".encode()).hexdigest()


def _dask_worker() -> str | None:
    """Address of the Dask worker running this code, None outside Dask (distributed is not
    imported then, so the thread runner does not pay for importing it)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return None


@task(retries=2, retry_delay_seconds=2, cache_key_fn=_recording_key, persist_result=True,
      result_serializer="json", task_run_name="parcellate-{index}")
def parcellate(plan, index: int, settings) -> dict:
    """The parcellation goes to the brainlm cache (plan.cache_dir, the flow's); the task
    result says how it went, where it ran and the sha256 of the file it parcellated.

    The result is persisted as JSON for Prefect's cache, so it carries no array: the flow
    gets the parcellation from the brainlm cache entry for that hash (an .npy, no pickle),
    without touching the input file. The flow derives the entry's key from the hash and its
    own settings rather than taking a path from the result: a result cached by an earlier
    run then cannot hand back an entry computed with another confounds table or cache
    version, and the thresholds that are in no key are checked again, as before."""
    from brainlm.data.pipeline import parcellate_one

    _, result, problem = parcellate_one(plan, index, settings)
    return {"index": index, "problem": problem,
            "source_hash": result.source_hash if result is not None else None,
            "pid": os.getpid(), "worker": _dask_worker()}


def task_runner(dask: str | None, workers: int = 1):
    """The task runner for `preprocess`: None (and no BRAINLM_DASK_ADDRESS) -> Prefect's
    default thread pool; "local" -> a LocalCluster of `workers` processes with one thread
    each (parcellation is NumPy work holding the GIL); anything else -> the address of a
    running Dask scheduler."""
    dask = dask or os.environ.get(DASK_ADDRESS_ENV) or None
    if dask is None:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(f"dask={dask!r} needs prefect-dask: pip install 'brainlm[cluster]' "
                          "(or run without dask)") from None
    if dask == "local":
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": max(1, int(workers)), "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=dask)


def _check_scheduler(address: str) -> int:
    """Fail early, naming the setting, when the scheduler cannot be reached (the connect
    timeout is dask's distributed.comm.timeouts.connect); returns its number of workers."""
    from distributed import Client

    try:
        with Client(address, set_as_default=False) as client:
            return len(client.scheduler_info()["workers"])
    except Exception as exc:  # timeouts (OSError), bad addresses (ValueError), odd replies
        raise ConfigError(f"cannot reach the Dask scheduler at {address!r} (dask= or "
                          f"{DASK_ADDRESS_ENV}): {exc}. Start one (`dask scheduler`), fix the "
                          "address, or use dask='local' for a cluster on this machine") from None


@flow(name="preprocess")
def preprocess(params_path: str = "params.yaml", dask: str | None = None) -> dict:
    """Parcellate every recording (one task each), then assemble the store.

    `dask`: None -> threads in this process, unless BRAINLM_DASK_ADDRESS is set; "local" -> a
    Dask LocalCluster with the params' preprocess `workers` processes; "tcp://host:8786" -> an
    existing cluster. The outputs are the same whatever runs the tasks: only where
    `parcellate_one` runs changes. A real cluster's scheduler and workers need brainlm and
    prefect-dask installed (this module's code travels by value) and the flow's paths on a
    shared filesystem: the recordings, and the brainlm cache the tasks write to
    (plan.cache_dir, from the flow's BRAINLM_CACHE_DIR; where the workers cannot write it,
    the assembly here parcellates again). Task arguments (plan, settings) go to the workers
    by cloudpickle, the atlas (a few MB) with each task.
    """
    params = load_params(params_path)
    runner = task_runner(dask, params["preprocess"].get("workers", 1))
    if runner is not None and runner.address:
        if _check_scheduler(runner.address) == 0:
            get_run_logger().warning("the Dask scheduler at %s has no worker yet: the tasks "
                                     "wait for one", runner.address)
    recordings = _preprocess_recordings if runner is None else \
        _preprocess_recordings.with_options(task_runner=runner)
    return recordings(params_path)


@flow(name="preprocess-recordings")
def _preprocess_recordings(params_path: str) -> dict:
    """The work of `preprocess`, a subflow because a flow's task runner is fixed when it is
    defined: `preprocess` picks the runner, this flow runs under it."""
    return run_stage("preprocess", load_params(params_path), parcellate=_parcellate_tasks)


def _parcellate_tasks(plan, settings) -> tuple[dict, dict]:
    """The preprocess job's parcellation step as one Prefect task per recording: (results,
    problems), each parcellation read from the brainlm cache entry its task names."""
    from brainlm.data.pipeline import collect_parcellated

    # every file's hash before the tasks start: the task threads' cache keys then only read
    # plan.source_hashes while Prefect walks the shared plan ("dictionary changed size")
    for index in plan.todo:
        plan.source_hash(index)
    outcomes = [f.result() for f in parcellate.map(unmapped(plan), plan.todo,
                                                     unmapped(settings))]
    where = sorted({o.get("worker") or f"pid {o.get('pid')}" for o in outcomes})
    get_run_logger().info("%d recordings parcellated by %s (a cached one names the run that "
                          "computed it)", len(outcomes), ", ".join(where) or "none")
    results, problems = {}, {}
    for outcome in outcomes:
        index, problem = outcome["index"], outcome["problem"]
        if problem is None:  # parcellated already: its entry in the brainlm cache
            _, result, problem = collect_parcellated(plan, index, settings,
                                                     outcome.get("source_hash"))
        if problem is None:
            results[index] = result
        else:
            problems[index] = problem
    return results, problems


@task
def stage(name: str, params_path: str, mask_ratio: float | None = None) -> dict:
    return run_stage(name, load_params(params_path), mask_ratio)


@flow(name="validate")
def validate(params_path: str = "params.yaml") -> dict:
    return stage("validate", params_path)


@flow(name="pretrain")
def pretrain(params_path: str = "params.yaml") -> dict:
    """One run per mask ratio of params.yaml, then all of them on one yardstick."""
    ratios = load_params(params_path)["mask_ratios"]
    results = {str(r): stage.with_options(task_run_name=f"pretrain-{r:g}")(
        "pretrain", params_path, r) for r in ratios}
    stage.with_options(task_run_name="compare-mask-ratios")("compare", params_path)
    return results


@flow(name="finetune")
def finetune(params_path: str = "params.yaml") -> dict:
    return stage("finetune", params_path)


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict:
    return stage("evaluate", params_path)
