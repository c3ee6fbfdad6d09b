"""Builders shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def age_effect_setup(root: Path, n_subjects: int, n_timepoints: int, n_parcels: int = 10) -> Path:
    """A store of parcellated tables whose parcel-0 amplitude grows with age (columns `age` and
    `group` old/young), and an untrained tiny model for it in root/model. Returns root."""
    import torch

    from brainlm.data.parcellate import ParcellationSettings
    from brainlm.data.pipeline import PreprocessConfig, run_preprocess
    from brainlm.data.store import BrainStore
    from brainlm.model.config import BrainLMConfig
    from brainlm.model.modeling import BrainLMForPretraining

    raw = root / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_subjects):
        age = rng.uniform(20, 80)
        x = rng.standard_normal((n_timepoints, n_parcels))
        x[:, 0] *= 0.5 + age / 40
        np.save(raw / f"sub-{i:02d}_task-rest_timeseries.npy", 100 + x)
        rows.append({"participant_id": f"sub-{i:02d}", "age": round(age, 1),
                     "group": "old" if age > 50 else "young"})
    pd.DataFrame(rows).to_csv(raw / "participants.tsv", sep="\t", index=False)
    pd.DataFrame(rng.uniform(-60, 60, (n_parcels, 3)), columns=["x", "y", "z"]).to_csv(
        root / "coords.tsv", sep="\t", index=False)
    run_preprocess(PreprocessConfig(
        inputs=[raw], out=root / "store", coords=root / "coords.tsv", input_tr=0.735,
        progress=False, cache_dir=root / "cache",
        settings=ParcellationSettings(min_timepoints=40, standardize="none", detrend=False)))
    store = BrainStore(root / "store")
    torch.manual_seed(0)
    model = BrainLMForPretraining(BrainLMConfig.from_preset("tiny", window=40, patch_size=10))
    model.config.parcel_coords = store.coords.tolist()
    model.config.atlas_hash = store.meta["atlas_hash"]
    model.save_pretrained(root / "model")
    return root
