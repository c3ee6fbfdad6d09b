"""BrainLM as an MLflow pyfunc, in MLflow's "models from code" style.

MLflow copies this file into the logged model and runs it at load time, so nothing is pickled:
the weights stay in the `save_pretrained` folder (safetensors) logged as the artifact "model",
and `load_context` reads them with `brainlm.model.load_model`. `brainlm.registry` logs it.

Input (`predict(context, model_input, params)`): windows of float values already scaled with the
folder's `scaler.safetensors`, each [P, T] (parcels x timepoints, as a nested list or 2-D array;
P = the parcel coordinates saved in config.json, T = the model's window), given as
- a pandas DataFrame with one window per row in the column "signal", or records
  `[{"signal": window}, ...]` (REST: `{"dataframe_records": [...]}`);
- a dict `{"signal": window}` (one window). Through the loaded pyfunc MLflow's schema check
  reads a dict as one row, so `{"signal": [w1, w2]}` only works on the bare class.

Output: a DataFrame with one row per window and columns `cls_0 .. cls_{H-1}` (the CLS
embedding; `params={"pooling": "mean"}` gives `mean_0 ..` instead, the mean of the patch tokens).

A registered fine-tuned model (artifact "finetune", the run folder) answers its task instead
(`brainlm.predictor`): the rows of "signal" are whole recordings [P, T >= window], unscaled
(`params={"scaled": True}` for recordings already scaled), and the output is `prediction`
(+ `proba_<class>`) or `forecast` per recording, what `brainlm evaluate` scored.
"""

from __future__ import annotations

import mlflow
import pandas as pd  # already loaded by mlflow.pyfunc; needed for the type hint below

BATCH = 64  # windows per forward pass: bounds memory for large requests


def _rows(model_input) -> list:
    """The "signal" entries of a DataFrame, records or a dict; a clear error otherwise."""
    if isinstance(model_input, list):  # records: [{"signal": window}, ...]
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if "signal" not in model_input.columns:
            raise ValueError(f"expected a column 'signal', got {list(model_input.columns)}")
        rows = list(model_input["signal"])
    elif isinstance(model_input, dict):
        if "signal" not in model_input:
            raise ValueError(f"expected a key 'signal', got {list(model_input)}")
        rows = model_input["signal"]
    else:
        raise ValueError(f"expected a DataFrame or dict with 'signal', got {type(model_input)}")
    return rows


def _recordings(model_input) -> list:
    """"signal" rows -> a list of [P, T] arrays (recordings may differ in length)."""
    import numpy as np

    rows = _rows(model_input)
    try:
        out = [np.asarray(r, dtype=np.float64) for r in rows]
    except ValueError as exc:
        raise ValueError(f"'signal' must hold [P, T] recordings of numbers: {exc}") from None
    if len(out) == 1 and out[0].ndim == 3:  # one batch given as a single array
        out = list(out[0])
    return out


def _windows(model_input):
    """"signal" rows -> float32 array [N, P, T]; a clear error for anything else."""
    import numpy as np

    rows = _rows(model_input)
    try:
        if isinstance(rows, list):  # rows may hold arrays or nested lists
            rows = [np.asarray(w, dtype=np.float32) for w in rows] if rows else []
            x = np.stack(rows) if rows and rows[0].ndim == 2 else np.asarray(rows, np.float32)
        else:
            x = np.asarray(rows, dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"'signal' must hold [P, T] windows of numbers: {exc}") from None
    if x.ndim == 2:  # a dict with one window
        x = x[None]
    if x.ndim != 3 or not x.size:
        raise ValueError(f"'signal' must hold [P, T] windows, got an array of shape {x.shape}")
    bad = ~np.isfinite(x)  # NaN/Inf (or beyond float32) would give NaN embeddings unsaid
    if bad.any():
        rows = sorted({int(i) for i in np.flatnonzero(bad.any(axis=(1, 2)))})
        raise ValueError(f"'signal' holds {int(bad.sum())} NaN/Inf values (or values beyond "
                         f"float32) in row(s) {rows[:10]}: give finite, scaled windows")
    return x


class BrainLMPyfunc(mlflow.pyfunc.PythonModel):
    """Window -> embedding, or recording -> a fine-tuned run's answer. Heavy imports (torch,
    transformers) happen in `load_context`."""

    def load_context(self, context):
        import torch

        from brainlm.model import load_model

        self.task = None
        if "finetune" in context.artifacts:  # a registered fine-tuning run answers its task
            from brainlm.predictor import FinetunedModel

            self.task = FinetunedModel(context.artifacts["finetune"],
                                       pretrained=context.artifacts["model"])
            return
        self.model = load_model(context.artifacts["model"])
        coords = getattr(self.model.config, "parcel_coords", None)
        self.coords = None if coords is None else torch.as_tensor(coords, dtype=torch.float32)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """The hint is what the loaded pyfunc passes after its schema check (it also silences
        MLflow's "add type hints" warning); the bare class takes dicts and records too."""
        import numpy as np
        import torch

        from brainlm.model import embed_windows

        if self.task is not None:
            return self.task.predict(_recordings(model_input),
                                     scaled=bool((params or {}).get("scaled", False)))
        pooling = (params or {}).get("pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {pooling!r} must be 'cls' or 'mean'")
        x = _windows(model_input)
        window, p = int(self.model.config.window), None if self.coords is None else len(self.coords)
        if x.shape[2] != window or (p is not None and x.shape[1] != p):
            raise ValueError(f"windows are [P, T] = {list(x.shape[1:])}; this model expects "
                             f"[{p if p is not None else 'P'}, {window}]")
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                batch = torch.from_numpy(x[start:start + BATCH])
                out.append(embed_windows(self.model, batch, self.coords)[pooling].float().numpy())
        emb = np.concatenate(out)
        return pd.DataFrame(emb, columns=[f"{pooling}_{i}" for i in range(emb.shape[1])])


mlflow.models.set_model(BrainLMPyfunc())
