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


Config = SynthConfig
OPTIONS = [
    Option("out", help="output folder (BIDS-like)"),
    Option("subjects", positive=True),
    Option("timepoints", positive=True),
    Option("tr", help="seconds", low=0.05, high=10),
    Option("seed"),
    Option("atlas", help="A424 (default) or a label NIfTI path"),
    Option("voxel_size", positive=True,
           help="grid of the written images in mm (the atlas grid or a multiple of it)"),
]
NOT_OPTIONS: dict = {}


def from_params(params: dict, root: Path) -> SynthConfig:
    from . import block
    from .options import from_block

    pre = block(params, "preprocess")
    return from_block(SynthConfig, OPTIONS, block(params, "synth"), "synth", fixed={
        "out": root / "data", "tr": float(pre["tr"]), "atlas": pre.get("atlas", "A424")})


def run(cfg: SynthConfig, tags: dict | None = None) -> dict:
    from ..atlas import load_atlas
    from ..data.synthetic import simulate_cohort, write_bids
    from ..tracking import job_run

    with job_run(NAME, f"synth-{cfg.subjects}x{cfg.timepoints}", cfg, tags) as tracker:
        atlas = load_atlas(cfg.atlas, allow_fallback=True)
        cohort = simulate_cohort(atlas.coords, cfg.subjects, cfg.timepoints, tr=cfg.tr,
                                 seed=cfg.seed)
        paths = write_bids(cohort, atlas, Path(cfg.out), tr=cfg.tr, voxel_size=cfg.voxel_size)
        values = {"recordings": len(paths), "atlas": atlas.name}
        tracker.summary(values)
    print(f"brainlm synth: {len(paths)} recordings of {cfg.timepoints} timepoints at TR "
          f"{cfg.tr:g} s, atlas {atlas.name} ({atlas.n_parcels} parcels) -> {cfg.out}")
    return values
