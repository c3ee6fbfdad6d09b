"""Prefect flows over the pipeline stages: orchestration only, the work is brainlm's.

Each flow calls the same `brainlm.stages` functions as `dvc repro` and `brainlm stage`.
`preprocess` maps one task per recording (retries; cached by the input file's hash and the
settings, so a second run skips unchanged recordings) before assembling the store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, task, unmapped

from brainlm.fileio import sha256_file
from brainlm.stages import load_params, preprocess_config, preprocess_done, run_stage


def _recording_key(context, parameters) -> str:
    """Cache key: sha256 of the recording file + parcellation settings + atlas."""
    plan, index = parameters["plan"], parameters["index"]
    rec = plan.recordings[index]
    settings = json.dumps(parameters["settings"].key(), sort_keys=True)
    return hashlib.sha256(f"{sha256_file(rec.path)}|{settings}|{plan.atlas.hash}|"
                          f"{rec.tr}".encode()).hexdigest()


@task(retries=2, retry_delay_seconds=2, cache_key_fn=_recording_key, persist_result=True,
      result_serializer="json", task_run_name="parcellate-{index}")
def parcellate(plan, index: int, settings) -> dict:
    from brainlm.data.pipeline import parcellate_one

    _, result, problem = parcellate_one(plan, index, settings)
    return {"index": index, "problem": problem}


@flow(name="preprocess")
def preprocess(params_path: str = "params.yaml") -> dict:
    from brainlm.data.pipeline import assemble, parcellate_one, plan_preprocess

    params = load_params(params_path)
    root = Path(params["root"])
    cfg = preprocess_config(params, root)
    plan = plan_preprocess(cfg)
    outcomes = [f.result() for f in parcellate.map(unmapped(plan), plan.todo,
                                                     unmapped(cfg.settings))]
    results, problems = {}, dict(plan.problems)
    for outcome in outcomes:
        if outcome["problem"] is not None:
            problems[outcome["index"]] = outcome["problem"]
        else:  # parcellated already: this reads the brainlm cache
            results[outcome["index"]] = parcellate_one(plan, outcome["index"], cfg.settings)[1]
    return preprocess_done(root, assemble(cfg, plan, results, problems))


@task
def stage(name: str, params_path: str, mask_ratio: float | None = None) -> dict:
    return run_stage(name, load_params(params_path), mask_ratio)


@flow(name="validate")
def validate(params_path: str = "params.yaml") -> dict:
    return stage("validate", params_path)


@flow(name="pretrain")
def pretrain(params_path: str = "params.yaml") -> dict:
    """One run per mask ratio of params.yaml."""
    ratios = load_params(params_path)["mask_ratios"]
    return {str(r): stage.with_options(task_run_name=f"pretrain-{r:g}")(
        "pretrain", params_path, r) for r in ratios}


@flow(name="finetune")
def finetune(params_path: str = "params.yaml") -> dict:
    return stage("finetune", params_path)


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict:
    return stage("evaluate", params_path)
