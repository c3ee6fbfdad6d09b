"""Scoring a folder of new recordings with a registered model (deployment `score/folder`):
orchestration only, the work is `brainlm predict` (`brainlm.jobs.predict`), tracked the same
way. The flow's run shows how many recordings were scored and which parcels drifted."""

from __future__ import annotations

from prefect import flow, get_run_logger, task


@task(task_run_name="predict-{model}")
def predict(model: str, inputs: list[str], out: str, options: dict) -> dict:
    from brainlm.jobs.predict import PredictConfig, run

    return run(PredictConfig(model=model, inputs=inputs, out=out, **options),
               tags={"brainlm.caller": "prefect"})


@flow(name="score")
def score(model: str = "models:/brainlm-age@champion", folder: str = "incoming",
          out: str = "runs/scores/predictions.parquet", options: dict | None = None) -> dict:
    """Predict every recording under `folder` with `model` into `out` (the drift report
    beside it). `options`: any other setting of `brainlm predict` (atlas, coords, input_tr,
    median_tol, iqr_tol, workers, ...)."""
    import json
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact

    values = predict(model, [folder], out, options or {})
    report = json.loads(Path(out).with_suffix(".report.json").read_text())
    drifted = report["drift"]["drifted_parcels"]
    get_run_logger().info("%d recordings scored, %d quarantined, %d parcels drifted",
                          values["recordings"], values["quarantined"], len(drifted))
    create_markdown_artifact(
        key="score", description="brainlm predict on a folder",
        markdown=(f"# Scored {values['recordings']} recordings with `{model}`\n\n"
                  f"- predictions: `{out}`\n- quarantined: {values['quarantined']}\n"
                  f"- parcels drifted from the training distribution: "
                  f"{', '.join(map(str, drifted)) or 'none'}\n"))
    return {**values, "drifted_parcels": drifted}
