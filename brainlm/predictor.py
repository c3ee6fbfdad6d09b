"""A fine-tuned model as a function of recordings: what the registered pyfunc, `mlflow models
serve` and `brainlm predict` answer with.

Input: parcellated recordings [P, T] in the model's parcel order, unscaled (the scaler the
training data was scaled with is applied here) or already scaled (`scaled=True`). Each
recording is cut into the windows `brainlm evaluate` scores (stride = window, the last one
ending at the recording's end) and the head's outputs are averaged per recording, exactly as
the fine-tuning run predicted its test subjects:
- regression: `prediction` (in the target's units);
- classification: `prediction` (the most probable class) and `proba_<class>` per class;
- forecast: `forecast`, the next `horizon` timepoints [P, horizon] after the recording's last
  `window - horizon` (in the input's units).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .fileio import read_json

BATCH = 32  # windows per forward pass


class FinetunedModel:
    """Encoder (the tuned one for `mode: full`), head, scaler and target coding of a run: the
    task model the run saved (`brainlm.model.tasks`), or, for runs written before it (and
    runs on released ViTMAE encoders), its head on the pretrained folder it names."""

    def __init__(self, run_dir, pretrained=None):
        """Read the run whole: a run folder is replaced by a rename (`write_run`), so one that
        changes identity while it is read was swapped by a new fine-tuning run; it is read
        again (twice at most) rather than mixing two runs' files."""
        run_dir = Path(run_dir)
        for _ in range(3):
            before = _identity(run_dir)
            try:
                self._read(run_dir, pretrained)
            except ConfigError:
                if _identity(run_dir) == before:
                    raise  # the run as it is, not a swap, is at fault
                continue
            if _identity(run_dir) == before:
                return
        raise ConfigError(f"{run_dir}: the run was written again while it was being read "
                          "(a fine-tuning run is writing it?); try again when it is done")

    def _read(self, run_dir: Path, pretrained) -> None:
        import torch

        from .model.tasks import is_task_folder, load_task_model

        try:
            self.meta = read_json(run_dir / "finetune.json")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{run_dir}: not a fine-tuning run (finetune.json: {exc})") from None
        cfg = self.meta.get("config") if isinstance(self.meta, dict) else None
        if not isinstance(cfg, dict) or "task" not in cfg or "model" not in self.meta:
            raise ConfigError(f"{run_dir / 'finetune.json'}: not a finished fine-tuning run "
                              "(no config.task or model)")
        self.task, self.pooling = cfg["task"], cfg.get("pooling", "cls")
        self.window = int(self.meta.get("window") or 0)
        self.classes = self.meta.get("classes")
        if is_task_folder(run_dir):  # the whole fine-tuned model, saved by save_pretrained
            model = load_task_model(run_dir)
            self.model, self.head = model.brainlm, model.head
            self.horizon = getattr(model.config, "horizon", None)
            self.window = self.window or int(self.model.config.window)
            folder = run_dir
        else:  # written before the task models: a head beside the pretrained folder
            folder = Path(pretrained or self.meta["model"])
            self._load_head(run_dir, folder, pretrained)
        self.head.eval()
        self.coords = torch.as_tensor(self.model.config.parcel_coords, dtype=torch.float32)
        scaler = run_dir / "scaler.safetensors"
        self.scaler_path = scaler if scaler.is_file() else folder / "scaler.safetensors"
        self._scaler = None

    def _load_head(self, run_dir: Path, folder: Path, pretrained) -> None:
        """finetuned.safetensors (head, and the tuned encoder of `mode: full`) on the
        pretrained encoder in `folder`: the layout of runs written before the task models."""
        from .model import load_model
        from .model.heads import ForecastHead, Head, pooled_width

        self._same_encoder(folder, pretrained)
        self.model = load_model(folder)
        state = _load_weights(run_dir / "finetuned.safetensors")
        try:
            encoder = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
            if encoder:
                self.model.load_state_dict(encoder)
            width = self.model.config.hidden_size
            pooled_to = pooled_width(self.model, self.pooling, len(self.model.config.parcel_coords))
            self.window = self.window or int(self.model.config.window)
            if self.task == "forecast":
                self.horizon = int(self.meta["horizon"])
                self.head = ForecastHead(width, self.horizon)
            else:
                self.head = Head(pooled_to, len(self.classes) if self.classes else 1, 0.0)
            self.head.load_state_dict({k[5:]: v for k, v in state.items()
                                       if k.startswith("head.")})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{run_dir}: finetuned.safetensors does not fit finetune.json and "
                              f"the encoder ({first[:300]}); fine-tune again") from None

    def _same_encoder(self, folder: Path, given) -> None:
        """The encoder at the run's recorded path must still be the one it was tuned on (a
        probe run keeps only its head; a retrained encoder would silently change every
        prediction)."""
        expected = self.meta.get("model_sha256")
        weights = folder / "model.safetensors"
        if expected and given is None and weights.is_file():
            from .fileio import sha256_file

            if sha256_file(weights) != expected:
                raise ConfigError(f"{folder}: the pretrained model changed since this run was "
                                  "fine-tuned from it (its weights differ); fine-tune again, or "
                                  "register the run while its encoder is unchanged")

    @property
    def scaler(self):
        """The training data's scaler (read on first use: scaled input never needs it)."""
        if self._scaler is None:
            from .data.scale import RobustScaler

            try:
                self._scaler = RobustScaler.load(self.scaler_path)
            except Exception as exc:  # missing or unreadable: name the file
                raise ConfigError(f"{self.scaler_path}: cannot read the scaler the model was "
                                  f"trained with ({exc}); give scaled recordings") from None
        return self._scaler

    @property
    def n_parcels(self) -> int:
        return len(self.coords)

    def _recordings(self, recordings, scaled: bool) -> list[np.ndarray]:
        need = self.window - self.horizon if self.task == "forecast" else self.window
        out = []
        for i, x in enumerate(recordings):
            x = np.asarray(x, dtype=np.float64)
            if x.ndim != 2 or x.shape[0] != self.n_parcels or x.shape[1] < need:
                raise ConfigError(f"recording {i}: shape {list(x.shape)}; this model takes "
                                  f"[{self.n_parcels} parcels, >= {need} timepoints] in its "
                                  "atlas's parcel order")
            if not np.isfinite(x).all():
                raise ConfigError(f"recording {i}: NaN or infinite values")
            x = x.astype(np.float32) if scaled else self.scaler.transform(x)
            if not np.isfinite(x).all():  # finite in float64, beyond float32 once scaled
                raise ConfigError(f"recording {i}: values too large for the model once scaled "
                                  "(beyond float32): are they in the training data's units?")
            out.append(x)
        return out

    def predict(self, recordings, scaled: bool = False):
        """recordings: a list of [P, T] arrays -> a DataFrame, one row per recording."""
        import pandas as pd

        xs = self._recordings(recordings, scaled)
        if self.task == "forecast":
            return pd.DataFrame({"forecast": [self._forecast(x, scaled).tolist() for x in xs]})
        p = self.window_outputs(xs)
        if self.classes:
            out = pd.DataFrame({f"proba_{c}": p[:, k] for k, c in enumerate(self.classes)})
            out.insert(0, "prediction", [self.classes[int(k)] for k in p.argmax(1)])
            return out
        return pd.DataFrame({"prediction": p[:, 0] * self.meta["target_std"]
                             + self.meta["target_mean"]})

    def window_outputs(self, xs: list) -> np.ndarray:
        """Per recording: the head's outputs averaged over its windows (class probabilities,
        or the standardized target) [n, outputs]."""
        import torch

        from .data.windows import sliding_batches
        from .model.heads import average_outputs, pooled

        with torch.no_grad():
            batches = ((self.head(pooled(self.model, x, self.coords, self.pooling)), owner)
                       for x, owner in sliding_batches(xs, self.window, self.window, BATCH))
            return average_outputs(batches, len(xs), len(self.classes) if self.classes else 1,
                                   self.classes)

    def _forecast(self, x: np.ndarray, scaled: bool) -> np.ndarray:
        """The next `horizon` timepoints of every parcel from the last window - horizon."""
        import torch

        from .model.heads import context_ids

        ctx = self.window - self.horizon
        window = np.zeros((self.n_parcels, self.window), np.float32)
        window[:, :ctx] = x[:, -ctx:]
        ids = context_ids(self.n_parcels, self.window, self.model.config.patch_size,
                          self.horizon)
        with torch.no_grad():
            hidden = self.model.encode(torch.from_numpy(window)[None], self.coords, ids)
            y = self.head(hidden[:, 1:], self.n_parcels)[0].float().numpy()
        return y if scaled else self.scaler.inverse_transform(y)


def _identity(folder: Path):
    """(device, inode, modification time) of a folder, None if it is missing."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # missing, truncated, not safetensors (SafetensorError)
        raise ConfigError(f"{path}: cannot read the fine-tuned weights ({exc})") from None
