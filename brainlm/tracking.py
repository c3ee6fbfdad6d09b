"""MLflow tracking, one path for every job: `job_run` opens a run (experiment = the job,
params = the job's config, lineage tags), the job's code logs through the `Tracker` it yields,
and the run ends FINISHED or FAILED. Active only when a tracking URI is set, a no-op otherwise:
code calls the same methods either way, so tracking never decides whether a run works.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path


def store_uri(root) -> str:
    """The project's default store, `sqlite:///<root>/mlflow/mlflow.db` (absolute, so every
    process and worker finds the same file)."""
    root = Path(root).resolve()
    (root / "mlflow").mkdir(exist_ok=True)
    return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').as_posix()}"


def project_root(path) -> Path | None:
    """The brainlm project (a folder with params.yaml and dvc.yaml) holding `path`, if any."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return None


def resolve_uri(out=None) -> str | None:
    """Where a job's run goes: MLFLOW_TRACKING_URI when set, else the store of the project the
    job writes into (its output folder inside a project), else nowhere."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = project_root(out) if out is not None else None
    return store_uri(root) if root is not None else None


REACH_TIMEOUT = 10.0  # seconds to decide that a tracking server is not there
_REACHED: set = set()


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT) -> None:
    """Refuse, within `timeout` seconds and before any work, a tracking URI that cannot answer:
    MLflow itself would retry a dead server for minutes with nothing printed. HTTP(S): the
    server's /health must answer (any HTTP reply counts, except 401/403); database URIs: the
    host's port must accept a connection; SQLite: the store's folder must be creatable and an
    existing file must be a SQLite database. Checked once per process and URI."""
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    from .errors import ConfigError

    if not uri or uri in _REACHED:
        return
    shown = masked_uri(uri)
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    hint = "start it (./mlflow/server.sh), or unset MLFLOW_TRACKING_URI to use the project's store"
    try:
        if scheme in ("http", "https"):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise ConfigError(f"tracking server {shown} refused the credentials (HTTP "
                                      f"{exc.code}): set MLFLOW_TRACKING_USERNAME/PASSWORD or "
                                      "MLFLOW_TRACKING_TOKEN") from None
        elif scheme in ("postgresql", "mysql", "mssql") and parts.hostname:
            default = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
            socket.create_connection((parts.hostname, parts.port or default), timeout).close()
        elif scheme == "sqlite" and uri.startswith("sqlite:///") and uri != "sqlite:///":
            try:
                _create_sqlite_store(uri, Path(uri[len("sqlite:///"):]))
            except OSError as exc:  # a file problem, not a server one
                raise ConfigError(f"tracking store {shown}: cannot create or open "
                                  f"{exc.filename or uri} ({exc.strerror or exc})") from None
        elif scheme == "sqlite":  # sqlite:// or sqlite:///: in memory, gone with the process
            raise ConfigError(f"tracking store {shown} has no file: runs would live in memory "
                              "and be lost; use sqlite:///path/to/mlflow.db")
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(f"tracking server {shown} is not reachable ({reason}): {hint}") from None
    _REACHED.add(uri)


def _create_sqlite_store(uri: str, path: Path) -> None:
    """A new SQLite store is created by one process at a time (a lock file beside it): MLflow
    creating the same tables from several processes at once fails ("duplicate column")."""
    import fcntl

    from .errors import ConfigError

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise ConfigError(f"tracking store {uri}: {path} is not a SQLite database")
            return
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, artifact_root(uri))  # creates every table, registry's too


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (`<db folder>/artifacts`). MLflow's default for SQLite is
    ./mlruns under whatever the current folder happens to be; a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()


# MLflow 3's UI opens an experiment on its GenAI traces page unless told it holds models
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(mlflow, name: str) -> str:
    """Get or create an experiment whose artifacts live beside the tracking store, tagged as
    model development so the UI opens it on its runs."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(KIND_TAG) != KIND:
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(
        mlflow.get_tracking_uri()), tags={KIND_TAG: KIND})


def flat_params(config, prefix: str = "") -> dict:
    """A config dataclass (or dict) as MLflow params: nested ones as `outer.inner`."""
    items = asdict(config) if is_dataclass(config) else dict(config)
    out = {}
    for key, value in items.items():
        if isinstance(value, dict) and value and key != "model":
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextmanager
def job_run(job: str, run_name: str, config, tags: dict | None = None,
            parent: Tracker | None = None, enabled: bool = True, uri: str | None = None,
            out=None):
    """One MLflow run of one job, whoever calls it (the command line, `brainlm stage`, DVC,
    a Prefect flow): experiment `job`, the config as params, `brainlm.job` and the caller's
    `tags`; FAILED when the body raises. With `parent` (an Optuna study's run), a child run in
    the parent's experiment and store. `out`: the folder the job writes (default: the
    config's `out` or `data`), which decides the default store (`resolve_uri`)."""
    from contextlib import ExitStack

    from .fileio import exclusive

    with ExitStack() as stack:
        written = getattr(config, "out", None) if parent is None and enabled else None
        if written is not None:  # one writer per output (DDP: rank 0 holds it)
            stack.enter_context(exclusive(written, "written", by=f"brainlm {job}"))
        if parent is not None:
            tracker = Tracker(parent.experiment, run_name=run_name, uri=parent.uri,
                              enabled=parent.active, parent=parent.run_id)
        else:
            out = out or getattr(config, "out", None) or getattr(config, "data", None)
            tracker = Tracker(job, run_name=run_name, uri=uri or resolve_uri(out),
                              enabled=enabled)
        try:
            tracker.params(flat_params(config))
            tracker.tags({"brainlm.job": job, **(tags or {})})
            yield tracker
        except BaseException:
            tracker.end("FAILED")  # a crashed run must not stay RUNNING in MLflow
            raise
        tracker.end()


_CREDENTIALS = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")
MAX_PARAM = 6000  # MLflow's limit on a param value


def masked_uri(uri: str) -> str:
    """A URI as it may be printed: the password of user:password@ masked."""
    return _CREDENTIALS.sub(r"\1***@", str(uri))


def _param_text(value) -> str:
    text = masked_uri(value)
    return text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 20] + f"... ({len(text)} chars)"


class Tracker:
    def __init__(self, experiment: str, run_name: str | None = None, uri: str | None = None,
                 enabled: bool = True, parent: str | None = None):
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.experiment = experiment
        self.active = bool(self.uri) and enabled
        self.run_id = None
        if not self.active:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        if self.uri.startswith(("http://", "https://")):  # fail in seconds, not minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        nested = parent is not None or mlflow.active_run() is not None  # a caller's run
        try:
            self.run_id = mlflow.start_run(experiment_id=experiment_id(mlflow, experiment),
                                           run_name=run_name, parent_run_id=parent,
                                           nested=nested).info.run_id
        except Exception as exc:  # before any work: refuse with the reason
            from .errors import ConfigError

            raise ConfigError(f"tracking store {masked_uri(self.uri)}: cannot "
                              f"start a run in experiment '{experiment}' ({exc})") from None

    def _failed(self, exc: Exception) -> None:
        """Tracking broke mid-run: say so once and go on untracked. The job's outputs are
        written locally either way, so a tracking failure never loses a trained model."""
        import warnings

        self.active = False
        try:  # leave no run open in this process (a later job would nest under it)
            self._mlflow.end_run(status="FAILED")
        except Exception:  # noqa: BLE001 (the backend is what failed)
            pass
        warnings.warn(f"MLflow tracking at {masked_uri(self.uri)} failed "
                      f"({type(exc).__name__}: {str(exc)[:300]}); the run goes on untracked, "
                      "its outputs are written locally as always", stacklevel=3)

    def _call(self, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (any failure of the tracking backend)
            self._failed(exc)

    def params(self, params: dict) -> None:
        """Logged as text: credentials in URLs masked, values cut at MLflow's length limit
        (a long --input list must not stop the run)."""
        self._call(lambda: self._mlflow.log_params({k: _param_text(v)
                                                    for k, v in params.items()}))

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
            self._call(client.log_batch, self.run_id, metrics=metrics[i:i + 1000])

    def summary(self, values: dict) -> None:
        """A job's returned values: numbers as metrics (step 0), strings as tags."""
        self.metrics({k: float(v) for k, v in values.items() if isinstance(v, (int, float))
                      and not isinstance(v, bool) and v == v}, step=0)
        self.tags({k: str(v) for k, v in values.items() if isinstance(v, (str, bool))})

    def artifacts(self, folder, path: str | None = None) -> None:
        self._call(lambda: self._mlflow.log_artifacts(str(folder), artifact_path=path))

    def artifact(self, path, folder: str | None = None) -> None:
        self._call(lambda: self._mlflow.log_artifact(str(path), artifact_path=folder))

    def tags(self, tags: dict) -> None:
        if tags:
            self._call(lambda: self._mlflow.set_tags(tags))

    def end(self, status: str = "FINISHED") -> None:
        self._call(lambda: self._mlflow.end_run(status=status))
        self.active = False
