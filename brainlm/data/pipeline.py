"""`brainlm preprocess`: recordings -> parcellated, split, scaled, stored, summarised.

Order matters for leakage: parcellate everything (per recording, no shared state), split by
subject, fit the scaler on the training split only, then scale every split with it.
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BrainLMError, ConfigError, InputError
from .parcellate import ENGINES, STANDARDIZE, ParcellationSettings, parcellate_recording
from .split import SPLITS, assign_splits


@dataclass
class PreprocessConfig:
    inputs: list
    out: Path
    atlas: str = "A424"
    settings: ParcellationSettings = field(default_factory=ParcellationSettings)
    input_tr: float | None = None
    participants: Path | None = None
    coords: Path | None = None  # coordinates for already-parcellated tables (else the atlas's)
    fractions: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    workers: int = 1
    cache_dir: Path | None = None  # default: <user cache>/brainlm/parcellated
    scaler: Path | None = None  # reuse this scaler (later inference) instead of fitting one
    allow_fallback_atlas: bool = False
    progress: bool = True

    def validate(self) -> None:
        s = self.settings
        if not (0.05 <= s.target_tr <= 10):
            raise ConfigError(f"target TR {s.target_tr} s is out of range (0.05-10 s)")
        if self.input_tr is not None and not (0.05 <= self.input_tr <= 30):
            raise ConfigError(f"input TR {self.input_tr} s is out of range (0.05-30 s)")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if s.engine not in ENGINES:
            raise ConfigError(f"engine '{s.engine}' must be one of {', '.join(ENGINES)}")
        if s.standardize not in STANDARDIZE:
            raise ConfigError(f"standardize '{s.standardize}' must be one of "
                              f"{', '.join(STANDARDIZE)}")
        if s.min_timepoints < 1:
            raise ConfigError(f"window/min timepoints must be >= 1, got {s.min_timepoints}")
        assign_splits([], self.fractions)  # checks the fractions
        from ..fileio import check_output, overlaps
        from .store import check_replaceable

        for item in self.inputs:
            if overlaps(self.out, item):
                raise ConfigError(f"--out {self.out} overlaps the input {item}: write the store "
                                  "to a separate folder")
        check_output(self.out, self.inputs)
        check_replaceable(self.out)
        nyquist = 0.5 / s.target_tr
        for name, f in (("high_pass", s.high_pass), ("low_pass", s.low_pass)):
            if f is not None and not (0 < f < nyquist):
                raise ConfigError(f"{name} {f} Hz must be between 0 and the Nyquist frequency "
                                  f"{nyquist:.3f} Hz of the target TR")
        if s.high_pass is not None and s.low_pass is not None and s.high_pass >= s.low_pass:
            raise ConfigError(f"--high-pass {s.high_pass} Hz must be below --low-pass "
                              f"{s.low_pass} Hz (the band kept lies between them)")


@dataclass
class Summary:
    out: Path
    atlas: str
    n_parcels: int
    per_split: dict  # split -> (subjects, recordings)
    quarantined: list  # (path, reason)
    warnings: list
    uncovered: dict  # recording_id -> number of parcels without coverage
    dead_parcels: list  # parcel labels with no data in any training recording
    seconds: float

    @property
    def n_kept(self) -> int:
        return sum(r for _, r in self.per_split.values())

    def format(self) -> str:
        lines = [f"brainlm preprocess: {self.n_kept} recordings kept, "
                 f"{len(self.quarantined)} quarantined, {self.seconds:.1f} s",
                 f"  atlas {self.atlas} ({self.n_parcels} parcels) -> {self.out}",
                 "  split    subjects  recordings"]
        for split, (subjects, recordings) in self.per_split.items():
            lines.append(f"  {split:<8} {subjects:>8}  {recordings:>10}")
        if self.uncovered:
            worst = max(self.uncovered.values())
            lines.append(f"  parcels without coverage: {len(self.uncovered)} recordings lack "
                         f"some (at most {worst} of {self.n_parcels})")
        else:
            lines.append("  parcels without coverage: none")
        if self.dead_parcels:
            shown = ", ".join(str(p) for p in self.dead_parcels[:10])
            more = "" if len(self.dead_parcels) <= 10 else f" (+{len(self.dead_parcels) - 10})"
            lines.append(f"  parcels with no training data (scaled to 0): {shown}{more}")
        if self.quarantined:
            lines.append("  quarantined:")
            for path, reason in self.quarantined[:15]:
                lines.append(f"    {path}: {reason}")
            if len(self.quarantined) > 15:
                lines.append(f"    ... {len(self.quarantined) - 15} more in manifest.parquet")
        for w in self.warnings[:5]:
            lines.append(f"  warning: {w}")
        if len(self.warnings) > 5:
            lines.append(f"  ... {len(self.warnings) - 5} more warnings")
        return "\n".join(lines)


def _split_value(rec) -> str | None:
    """The recording's `split` from participants.tsv, stripped; None when not given."""
    value = rec.phenotypes.get("split")
    if value is None or value != value or not str(value).strip():
        return None
    return str(value).strip()


@dataclass
class Plan:
    """What preprocessing will do, decided before any image is read."""

    atlas: object
    recordings: list
    problems: dict  # index -> reason, known from discovery alone
    warnings: list
    cache_dir: Path
    started: float
    source_hashes: dict = field(default_factory=dict)  # index -> sha256 of its file, if known

    def source_hash(self, index: int) -> str | None:
        """sha256 of recording `index`'s file, computed once per plan and kept (a Prefect
        task's cache key and the brainlm cache then share one read); None when it cannot be
        read (parcellating it says why)."""
        if index not in self.source_hashes:
            from .source import hash_file

            try:
                self.source_hashes[index] = hash_file(self.recordings[index].path)[0]
            except OSError:
                return None
        return self.source_hashes[index]

    @property
    def todo(self) -> list[int]:
        return [i for i in range(len(self.recordings)) if i not in self.problems]


def plan_preprocess(cfg: PreprocessConfig) -> Plan:
    from ..atlas import atlas_from_coords, load_atlas
    from .ingest import attach_phenotypes, discover, find_participants

    cfg.validate()
    started = time.perf_counter()
    if cfg.coords is not None:  # parcellated tables: their coordinates are the atlas
        atlas = atlas_from_coords(cfg.coords)
    else:
        atlas = load_atlas(cfg.atlas, allow_fallback=cfg.allow_fallback_atlas)
    recordings = discover(cfg.inputs, cfg.input_tr)
    if not recordings:
        raise ConfigError(f"no recordings found in {', '.join(map(str, cfg.inputs))} (looked for "
                          "*.nii, *.nii.gz and *_timeseries.tsv, .tsv.gz, .csv or .npy)")
    if cfg.coords is not None:
        for rec in recordings:
            if rec.kind == "nifti" and rec.problem is None:
                rec.problem = ("--coords applies to parcellated tables; parcellate NIfTI "
                               "recordings with --atlas in a separate run")
    participants = cfg.participants or find_participants(cfg.inputs)
    warnings_ = attach_phenotypes(recordings, participants)
    wrong = {r.subject: r.phenotypes["split"] for r in recordings
             if _split_value(r) not in (None, *SPLITS)}
    if wrong:  # before any image is read: a mistyped split would silently move subjects
        raise ConfigError(f"{participants}: column 'split' must be one of {', '.join(SPLITS)} "
                          "(or empty: assigned by the fractions); got "
                          + ", ".join(f"{s} {v!r}" for s, v in sorted(wrong.items())[:10]))
    problems = {i: r.problem for i, r in enumerate(recordings) if r.problem}
    from ..fileio import writable_folder

    cache = writable_folder(cfg.cache_dir or _default_cache(), "the parcellation cache "
                            "(--cache-dir, else the user cache)")
    return Plan(atlas, recordings, problems, warnings_, cache, started)


def parcellate_one(plan: Plan, index: int, settings: ParcellationSettings):
    """(index, Parcellated or None, problem or None): one recording, errors as reasons. A
    hash of its file already in `plan.source_hashes` is used, not computed again."""
    return _outcome(plan, index, settings, plan.source_hashes.get(index))


def collect_parcellated(plan: Plan, index: int, settings: ParcellationSettings,
                        source_hash: str | None):
    """(index, Parcellated or None, problem or None) of a recording a task has parcellated
    into plan.cache_dir: its entry, found from `source_hash` (the file's sha256 the task
    used) under these settings without reading the file, thresholds checked again. Where the
    entry is missing (a worker that could not write this cache) or the hash unknown, the
    recording is parcellated here."""
    return _outcome(plan, index, settings, source_hash)


def _outcome(plan: Plan, index: int, settings: ParcellationSettings, source_hash: str | None):
    rec = plan.recordings[index]
    try:
        return index, parcellate_recording(rec, plan.atlas, settings, plan.cache_dir,
                                           source_hash=source_hash), None
    except InputError as exc:
        return index, None, exc.problem
    except BrainLMError as exc:
        return index, None, str(exc)
    except Exception as exc:  # a bug or an unforeseen file: report it, let the others go on
        if os.environ.get("BRAINLM_DEBUG"):
            traceback.print_exc()
        return index, None, f"unexpected {type(exc).__name__}: {exc}"


# Worker state: set before the pool forks, so the plan is not pickled per task.
_WORKER: dict = {}


def _work(index: int):
    return parcellate_one(_WORKER["plan"], index, _WORKER["settings"])


def _init_worker():
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _default_cache() -> Path:
    from ..atlas import cache_dir

    return cache_dir() / "parcellated"


def run_preprocess(cfg: PreprocessConfig) -> Summary:
    plan = plan_preprocess(cfg)
    results: dict[int, object] = {}
    problems: dict[int, str] = dict(plan.problems)
    todo = plan.todo
    _WORKER.update(plan=plan, settings=cfg.settings)
    bar = _progress(len(todo), cfg.progress)
    if cfg.workers == 1 or len(todo) <= 1:
        for index, result, problem in map(_work, todo):
            _collect(index, result, problem, results, problems, bar)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=ctx,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_work, i): i for i in todo}
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except BrokenProcessPool:  # a worker died (out of memory, a crash)
                    outcome = (futures[fut], None, "the worker process died while parcellating "
                               "it (out of memory?); rerun with fewer --workers")
                _collect(*outcome, results, problems, bar)
    bar.close()
    return assemble(cfg, plan, results, problems)


def assemble(cfg: PreprocessConfig, plan: Plan, results: dict, problems: dict) -> Summary:
    """Split by subject, fit the scaler on training subjects, scale, write the store."""
    from .scale import RobustScaler
    from .store import write_store

    atlas, recordings, warnings_ = plan.atlas, plan.recordings, list(plan.warnings)
    fixed = {rec.subject: value for i, rec in enumerate(recordings)
             if i in results and (value := _split_value(rec))}  # checked when planning
    split_of = assign_splits(sorted({recordings[i].subject for i in results}), cfg.fractions,
                             cfg.seed, fixed)
    quarantined = [(str(recordings[i].path), problems[i]) for i in sorted(problems)]
    if not results:
        raise ConfigError(f"no recording could be processed ({len(problems)} quarantined):\n"
                          + "\n".join(f"  {p}: {r}" for p, r in quarantined[:20]))

    train = [i for i in results if split_of[recordings[i].subject] == "train"]
    if cfg.scaler is not None:
        try:
            scaler = RobustScaler.load(cfg.scaler)
        except Exception as exc:
            raise ConfigError(f"{cfg.scaler}: cannot read the scaler ({exc})") from None
        scaler.check_compatible(atlas_hash=atlas.hash, tr=cfg.settings.target_tr,
                                n_parcels=atlas.n_parcels)
    elif not train:
        raise ConfigError("no training subjects: add subjects or change the split fractions")
    else:
        scaler = RobustScaler.fit(
            [results[i].signals for i in train], [results[i].coverage for i in train],
            seed=cfg.seed, atlas=atlas.name, atlas_hash=atlas.hash, tr=cfg.settings.target_tr,
            n_subjects=len({recordings[i].subject for i in train}),
            settings=cfg.settings.key())

    kept, uncovered = [], {}
    for i in sorted(results):
        rec, res = recordings[i], results[i]
        row = _manifest_row(rec, cfg, "ok", None)
        row.update(split=split_of[rec.subject], tr_source=res.tr_source,
                   n_timepoints_source=res.n_timepoints_source, source_hash=res.source_hash,
                   uncovered=[int(v) for v in atlas.label_values[~res.coverage]],
                   signals=scaler.transform(res.signals, res.coverage))
        if not res.coverage.all():
            uncovered[rec.recording_id] = int((~res.coverage).sum())
        warnings_ += [f"{rec.path}: {note}" for note in res.notes]
        kept.append(row)
    bad = [_manifest_row(recordings[i], cfg, "quarantined", problems[i]) for i in sorted(problems)]
    per_split = {s: (len({r["subject"] for r in kept if r["split"] == s}),
                     sum(r["split"] == s for r in kept)) for s in SPLITS}
    write_store(cfg.out, kept, bad, scaler, atlas,
                extra_meta={"seed": cfg.seed, "fractions": list(cfg.fractions),
                            "settings": cfg.settings.key()})
    dead = [int(v) for v in atlas.label_values[~scaler.has_data]]
    return Summary(out=Path(cfg.out), atlas=atlas.name, n_parcels=atlas.n_parcels,
                   per_split=per_split, quarantined=quarantined, warnings=warnings_,
                   uncovered=uncovered, dead_parcels=dead,
                   seconds=time.perf_counter() - plan.started)


def _collect(index, result, problem, results, problems, bar):
    if result is not None:
        results[index] = result
    else:
        problems[index] = problem
        bar.write(f"quarantined {_WORKER['plan'].recordings[index].path}: {problem}")
    bar.update(1)


def _manifest_row(rec, cfg, status, reason) -> dict:
    row = {"recording_id": rec.recording_id, "subject": rec.subject, "session": rec.session,
           "task": rec.task, "run": rec.run, "status": status, "reason": reason,
           "source_path": _portable(rec.path), "tr": cfg.settings.target_tr}
    for key, value in rec.phenotypes.items():
        if key != "split":  # a phenotype named like a manifest column keeps a prefix
            row[key if key not in _MANIFEST_COLUMNS else f"pheno_{key}"] = value
    return row


def _portable(path) -> str:
    """Relative to the working directory when inside it (a repository's data/ stays valid in
    every clone, and DVC hashes of the store match), absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


_MANIFEST_COLUMNS = {"recording_id", "subject", "session", "task", "run", "status", "reason",
                     "source_path", "tr", "split", "tr_source", "n_timepoints_source",
                     "source_hash", "uncovered", "offset", "n_parcels", "n_timepoints"}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="parcellating", unit="rec", disable=not enabled,
                dynamic_ncols=True)

