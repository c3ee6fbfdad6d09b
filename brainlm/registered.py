"""Reading a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) without running
anything it holds.

`mlflow.pyfunc.load_model` runs the model's own loader: for a pickled `python_model` that is
cloudpickle, and for a models-from-code model the logged copy of its code, both written by
whoever could register a version. Here the version's files are downloaded as files, its
`MLmodel` is checked to be this project's pyfunc (one flavour, python_function logged from
code, our `mlflow_model.py`, no pickled `python_model`, only our artifacts), and the installed
`brainlm` reads the artifacts' safetensors and JSON itself: the logged code is never run.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

ARTIFACTS = ("model", "finetune")  # what `registry._log_pyfunc` logs
MLMODEL_LIMIT = 1 << 20  # bytes; ours is a few kB


def check_mlmodel(folder, uri: str) -> dict:
    """{artifact name: local path} of a downloaded version in `folder`, once its MLmodel shows
    it is this project's pyfunc; a ConfigError naming `uri` and what differs otherwise."""
    import yaml

    folder = Path(folder).resolve()
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file() or mlmodel.stat().st_size > MLMODEL_LIMIT:
        raise ConfigError(f"{uri}: no MLmodel file of at most {MLMODEL_LIMIT} bytes; not a "
                          "model this project registered")
    try:
        spec = yaml.safe_load(mlmodel.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: its MLmodel is not YAML ({str(exc)[:200]})") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    pyfunc = (flavors or {}).get("python_function") if isinstance(flavors, dict) else None
    problems = []
    if not isinstance(pyfunc, dict) or set(flavors) != {"python_function"}:
        problems.append(f"flavours {sorted(flavors or {})} (expected python_function only)")
        pyfunc = pyfunc if isinstance(pyfunc, dict) else {}
    if pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or \
            "python_model" in pyfunc:
        problems.append(f"loader {pyfunc.get('loader_module')!r}, python_model "
                        f"{pyfunc.get('python_model')!r} (a pickled python_model runs code when "
                        "loaded; ours is logged from code)")
    if Path(str(pyfunc.get("model_code_path", ""))).name != "mlflow_model.py":
        problems.append(f"model code {pyfunc.get('model_code_path')!r} (ours is "
                        "brainlm/mlflow_model.py)")
    artifacts = pyfunc.get("artifacts") or {}
    if not isinstance(artifacts, dict) or "model" not in artifacts or \
            not set(artifacts) <= set(ARTIFACTS):
        problems.append(f"artifacts {sorted(artifacts) if isinstance(artifacts, dict) else artifacts!r}"
                        f" (expected model, and finetune for a fine-tuned model)")
    if problems:
        raise ConfigError(f"{uri} is not this project's BrainLM pyfunc, refused before loading: "
                          + "; ".join(problems))
    paths = {}
    for name, entry in artifacts.items():
        rel = entry.get("path") if isinstance(entry, dict) else None
        path = (folder / str(rel)).resolve() if rel else None
        if path is None or folder not in path.parents or not path.is_dir():
            raise ConfigError(f"{uri}: artifact {name!r} ({rel!r}) is not a folder inside the "
                              "model")
        paths[name] = path
    return paths


def load_registered_task(uri: str, folder):
    """The fine-tuned model of a registered version (`predictor.FinetunedModel`), downloaded
    into `folder` (kept by the caller while the model is used) and checked first."""
    import mlflow

    from .predictor import FinetunedModel
    from .tracking import masked_uri

    try:  # files only: nothing of the version is imported or unpickled here
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
    except Exception as exc:  # unknown name/alias/version, unreachable registry
        raise ConfigError(f"{uri}: cannot load the registered model from "
                          f"{masked_uri(mlflow.get_tracking_uri())} ({str(exc)[:300]})") from None
    paths = check_mlmodel(local, uri)
    if "finetune" not in paths:
        raise ConfigError(f"{uri} is a pretrained model without a head: it embeds, it does not "
                          "predict (register a fine-tuning run)")
    return FinetunedModel(paths["finetune"], pretrained=paths["model"])
