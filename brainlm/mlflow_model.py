"""BrainLM as an MLflow pyfunc, in MLflow's "models from code" style.

MLflow copies this file into the logged model and runs it at load time, so nothing is pickled:
the weights stay in the `save_pretrained` folder (safetensors) logged as the artifact "model",
and `load_context` reads them with `brainlm.model.load_model`. `brainlm.registry` logs it.

Input (`predict(context, model_input, params)`): a pandas DataFrame, or a dict of lists, with a
column/key "signal" holding one window per row as a nested list or 2-D array [P, T] (parcels x
timepoints) of float values already scaled with the folder's `scaler.safetensors`. P must equal
the number of parcel coordinates saved in `config.json` and T the model's window. Over REST:
`{"dataframe_records": [{"signal": [[...], ...]}, ...]}`.

Output: a DataFrame with one row per window and columns `cls_0 .. cls_{H-1}` (the CLS
embedding; `params={"pooling": "mean"}` gives `mean_0 ..` instead, the mean of the patch tokens).
"""

from __future__ import annotations

import mlflow

BATCH = 64  # windows per forward pass: bounds memory for large requests


def _windows(model_input):
    """Rows of "signal" -> float32 array [N, P, T]; a clear error for anything else."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "signal" not in model_input.columns:
            raise ValueError(f"expected a column 'signal', got {list(model_input.columns)}")
        rows = list(model_input["signal"])
    elif isinstance(model_input, dict):
        if "signal" not in model_input:
            raise ValueError(f"expected a key 'signal', got {list(model_input)}")
        rows = model_input["signal"]
        if isinstance(rows, np.ndarray) and rows.ndim == 2:
            rows = [rows]
        rows = list(rows)
    else:
        raise ValueError(f"expected a DataFrame or dict with 'signal', got {type(model_input)}")
    if not rows:
        raise ValueError("no windows in 'signal'")
    try:
        windows = [np.asarray([np.asarray(r, dtype=np.float32) for r in w]) for w in rows]
        x = np.stack(windows).astype(np.float32, copy=False)
    except ValueError as exc:
        raise ValueError(f"'signal' rows must all be [P, T] windows of numbers: {exc}") from None
    if x.ndim != 3:
        raise ValueError(f"'signal' rows must be 2-D [P, T] windows, got shape {x.shape[1:]}")
    return x


class BrainLMPyfunc(mlflow.pyfunc.PythonModel):
    """Window -> embedding. Heavy imports (torch, transformers) happen in `load_context`."""

    def load_context(self, context):
        import torch

        from brainlm.model import load_model

        self.model = load_model(context.artifacts["model"])
        coords = getattr(self.model.config, "parcel_coords", None)
        self.coords = None if coords is None else torch.as_tensor(coords, dtype=torch.float32)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd
        import torch

        from brainlm.model import embed_windows

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
