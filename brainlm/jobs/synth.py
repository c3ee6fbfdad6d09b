"""Job `synth`: a synthetic BIDS cohort with known networks and phenotype effects (the demo's
data/, tracked by data.dvc rather than a dvc.yaml stage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.parcellate import ParcellationSettings
from ..data.pipeline import PreprocessConfig
from .options import Option

NAME = "synth"
METRICS = None  # writes data/, which data.dvc versions: no metrics file


@dataclass
class SynthConfig:
    out: Path
    subjects: int = 20
    timepoints: int = 400
    tr: float = ParcellationSettings.target_tr
    seed: int = 0
    atlas: str = PreprocessConfig.atlas
    voxel_size: float = 4.0  # mm: the atlas grid or a multiple of it
    wave: int = 0  # k > 0: the base cohort's val/test subjects + new training subjects (seed + k)
    split: tuple = PreprocessConfig.fractions  # how preprocess splits: which subjects are held out
    split_seed: int = PreprocessConfig.seed


Config = SynthConfig
OPTIONS = [
    Option("out", help="output folder (BIDS-like)"),
    Option("subjects", positive=True),
    Option("timepoints", positive=True),
    Option("tr", help="seconds", low=0.05, high=10),
    Option("seed", low=0),
    Option("atlas", help="A424 (default) or a label NIfTI path"),
    Option("voxel_size", positive=True, high=16,
           help="grid of the written images in mm (the atlas grid or a multiple of it; "
           "coarser than 16 mm leaves most parcels without a voxel)"),
    Option("wave", low=0, help="0: the base cohort; k > 0: its validation and test subjects "
           "unchanged plus a new wave of training subjects drawn with seed + k"),
]
NOT_OPTIONS = {"split": "preprocess's split fractions (params.yaml preprocess.split)",
               "split_seed": "preprocess's split seed (params.yaml preprocess.seed)"}


def from_params(params: dict, root: Path) -> SynthConfig:
    from . import block
    from . import preprocess as preprocess_job
    from .options import from_block

    pre = preprocess_job.from_params(params, root)  # its block, checked as that stage does
    return from_block(SynthConfig, OPTIONS, block(params, "synth"), "synth", fixed={
        "out": root / "data", "tr": pre.settings.target_tr, "atlas": pre.atlas,
        "split": pre.fractions, "split_seed": pre.seed})


def next_wave(data: Path) -> int:
    """The wave after the one in `data` (participants.tsv's `wave` column; none: wave 0)."""
    import pandas as pd

    path = Path(data) / "participants.tsv"
    if not path.is_file():
        return 0
    table = pd.read_csv(path, sep="\t")
    return int(table["wave"].max()) + 1 if "wave" in table else 1


def _same_atlas_as_before(data: Path, atlas) -> None:
    """A new wave replaces a cohort made on one atlas: refuse to switch atlas under it (a
    worker without the A424 files would otherwise retrain everything on the fallback)."""
    import json

    from ..errors import ConfigError

    try:
        before = json.loads((data / "ground_truth.json").read_text())["atlas"]
    except (OSError, ValueError, KeyError):
        return
    if before.get("hash") and before["hash"] != atlas.hash:
        raise ConfigError(f"{data} was made on atlas {before.get('name')} ({before['hash']}), "
                          f"this process has {atlas.name} ({atlas.hash}): set "
                          "BRAINLM_ATLAS_DIR (or the A424 cache) where this runs")


def run(cfg: SynthConfig, tags: dict | None = None) -> dict:
    from ..atlas import announce, load_atlas
    from ..data.synthetic import simulate_cohort, with_new_wave, write_bids
    from ..tracking import job_run

    with job_run(NAME, f"synth-{cfg.subjects}x{cfg.timepoints}", cfg, tags) as tracker:
        atlas = load_atlas(cfg.atlas, allow_fallback=True)
        announce(atlas, NAME, cfg.atlas)
        cohort = simulate_cohort(atlas.coords, cfg.subjects, cfg.timepoints, tr=cfg.tr,
                                 seed=cfg.seed)
        if cfg.wave:
            from ..data.split import assign_splits

            _same_atlas_as_before(Path(cfg.out), atlas)

            ids = cohort.participants["participant_id"].astype(str).tolist()
            split = assign_splits(ids, cfg.split, cfg.split_seed)
            held = {pid: split[pid] for pid in ids if split[pid] != "train"}
            cohort = with_new_wave(cohort, held, cfg.wave, atlas.coords)
        paths = write_bids(cohort, atlas, Path(cfg.out), tr=cfg.tr, voxel_size=cfg.voxel_size)
        values = {"recordings": len(paths), "atlas": atlas.name}  # wave and seed: params
        tracker.summary(values)
    wave = f" (wave {cfg.wave}, seed {cohort.seed})" if cfg.wave else ""
    print(f"brainlm synth: {len(paths)} recordings{wave} of {cfg.timepoints} timepoints at TR "
          f"{cfg.tr:g} s, atlas {atlas.name} ({atlas.n_parcels} parcels) -> {cfg.out}")
    return values
