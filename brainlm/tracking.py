"""Optional MLflow tracking: active only when a tracking URI is set, a no-op otherwise.

Training code calls the same methods either way, so tracking never decides whether a run works.
"""

from __future__ import annotations

import os
from pathlib import Path


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`<db folder>/artifacts`). MLflow's default for SQLite is
    ./mlruns under whatever the current folder happens to be; a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()


def experiment_id(mlflow, name: str) -> str:
    """Get or create an experiment whose artifacts live beside the tracking store."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(
        mlflow.get_tracking_uri()))


class Tracker:
    def __init__(self, experiment: str, run_name: str | None = None, uri: str | None = None,
                 enabled: bool = True):
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.active = bool(self.uri) and enabled
        self.run_id = None
        if not self.active:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        self.run_id = mlflow.start_run(experiment_id=experiment_id(mlflow, experiment),
                                       run_name=run_name).info.run_id

    def params(self, params: dict) -> None:
        if self.active:
            flat = {k: (str(v) if isinstance(v, (list, tuple, dict, Path)) else v)
                    for k, v in params.items()}
            self._mlflow.log_params(flat)

    def metrics(self, metrics: dict, step: int) -> None:
        self.metrics_steps([(step, metrics)])

    def metrics_steps(self, rows: list) -> None:
        """Metrics of several steps [(step, {name: value})] in as few requests as MLflow allows."""
        if not self.active or not rows:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows
                   for k, v in values.items()]
        client = self._mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def artifacts(self, folder, path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifacts(str(folder), artifact_path=path)

    def tags(self, tags: dict) -> None:
        if self.active:
            self._mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.active = False
