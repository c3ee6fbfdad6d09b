"""Find recordings (BIDS-like folders, file lists, already-parcellated tables) and phenotypes.

Nothing here reads image data: discovery is cheap so the quarantine list and the split can be
decided before any heavy work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import read_json

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".npy")
# BIDS folders that hold no raw recordings of the dataset (derivatives: other pipelines'
# outputs; sourcedata: files before conversion); given as the input, they are read
_NOT_RECORDINGS = ("derivatives", "sourcedata")
# the entities that tell one functional run from another (BIDS order); a label runs to the next
# "_" or "/"; BIDS allows letters and digits only, and a label with anything else is refused
# rather than cut short (sub-01-02 is not sub-01)
_ID_ENTITIES = ("ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "flip", "inv", "mt",
                "part", "space", "res", "den", "desc", "seg", "atlas")
_ENTITY = re.compile(r"(?:^|[_/])(sub|" + "|".join(_ID_ENTITIES) + r")-([^_/]+)")
_LABEL = re.compile(r"[a-zA-Z0-9]+")


@dataclass
class Recording:
    """One functional run. `subject` is always in BIDS form ("sub-XXX")."""

    path: Path
    subject: str
    session: str = ""
    task: str = ""
    run: str = ""
    entities: dict = field(default_factory=dict)  # all BIDS entities of the file name
    kind: str = "nifti"  # "nifti" or "timeseries" (already parcellated, time x parcels)
    tr: float | None = None  # from a JSON sidecar or the user; None -> read the header
    tr_origin: str = "header"  # "user", "sidecar" or "header"
    confounds: Path | None = None
    phenotypes: dict = field(default_factory=dict)
    problem: str | None = None  # set when discovery already knows it cannot be used

    @property
    def recording_id(self) -> str:
        """sub-X plus every other entity of the name (space, desc, seg... keep outputs of
        one run in different spaces or atlases apart)."""
        return "_".join([self.subject] + [f"{k}-{self.entities[k]}" for k in _ID_ENTITIES
                                          if self.entities.get(k)])


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def _is_timeseries(p: Path) -> bool:
    """fMRIPrep/XCP-D style `*_timeseries.tsv|csv|npy`, but not the confounds table."""
    name = p.name.lower()
    return (any(name.endswith("_timeseries" + s) for s in TABLE_SUFFIXES)
            and "desc-confounds" not in name)


def _entities(path: Path, root: Path | None) -> tuple[dict, str | None]:
    """The BIDS entities of a file (its name wins over its folders'), and a problem when a
    folder says another subject or session than the name (sub-047/func/sub-048_...)."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    found = dict(_ENTITY.findall("_" + _strip_ext(rel.name)))  # "task-rest.nii.gz": "rest"
    problem = None
    for folder in rel.parts[:-1]:
        for key, value in _ENTITY.findall("_" + folder):
            if key in ("sub", "ses") and found.get(key, value) != value and problem is None:
                problem = (f"the folder says {key}-{value}, the file name {key}-{found[key]}: "
                           "which is it? (rename one)")
            found.setdefault(key, value)
    return found, problem


def _strip_ext(name: str) -> str:
    for suffix in (".nii.gz", ".nii", *TABLE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _walk(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under `root`, symbolic links to folders followed (once each), hidden entries
    (.git, macOS ._ files) and BIDS's derivatives/ and sourcedata/ left out; and the entries
    that look like recordings but cannot be read as files, each with the reason."""
    import os

    files, odd, seen = [], [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _NOT_RECORDINGS)
        for name in dirs:
            if _looks_like_recording(name):
                odd.append((Path(folder) / name, "a folder named like a recording, not a file"))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif _looks_like_recording(name):
                odd.append((path, "a broken symbolic link (or not a regular file)"))
    return files, odd


def _looks_like_recording(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(NIFTI_SUFFIXES) or any(
        lower.endswith("_timeseries" + s) for s in (*TABLE_SUFFIXES, ".parquet", ".csv.gz"))


def _unreadable_name(path: Path) -> str | None:
    """Why a file named like a recording is not read as one, or None."""
    name = path.name
    if _looks_like_recording(name) and not (_is_nifti(path) or _is_timeseries(path)) \
            and "desc-confounds" not in name.lower():
        if name.lower().endswith(NIFTI_SUFFIXES) or name.lower().endswith(
                tuple("_timeseries" + s for s in TABLE_SUFFIXES)):
            return "an upper-case extension: rename it with a lower-case one (.nii.gz, .tsv)"
        return ("a table format that is not read: save it as .tsv, .csv or .npy (time x "
                "parcels)")
    return None


def _sidecar_tr(path: Path) -> tuple[float | None, str | None]:
    """(TR, problem) from the BIDS JSON sidecar; a sidecar that exists but is unusable is a
    problem, not something to skip silently (the header TR may be wrong in the same way)."""
    sidecar = path.with_name(_strip_ext(path.name) + ".json")
    if sidecar.is_dir():
        return None, f"JSON sidecar {sidecar.name} is a folder"
    if not sidecar.is_file():
        return None, None
    try:
        meta = read_json(sidecar)
    except (OSError, ValueError) as exc:
        return None, f"unreadable JSON sidecar {sidecar.name} ({exc})"
    if not isinstance(meta, dict):
        return None, f"JSON sidecar {sidecar.name} is not an object of BIDS fields"
    if "RepetitionTime" not in meta:
        return None, None
    tr = meta["RepetitionTime"]
    if isinstance(tr, bool) or not isinstance(tr, (int, float)) or not tr > 0:
        return None, f"RepetitionTime {tr!r} in {sidecar.name} is not a positive number"
    return float(tr), None


def _confounds_for(path: Path) -> Path | None:
    """fMRIPrep's `*_desc-confounds_timeseries.tsv` beside a `*_bold.nii.gz`."""
    stem = _strip_ext(path.name)
    prefix = re.split(r"_(?:space|res|desc)-|_bold$", stem)[0]
    for candidate in sorted(path.parent.glob(prefix + "*desc-confounds_timeseries.tsv")):
        return candidate
    return None


def discover(inputs, input_tr: float | None = None) -> list[Recording]:
    """Recordings under folders and/or explicit files, sorted by recording id.

    In a folder, NIfTI files named `*_bold.nii[.gz]` are taken when there are any (a BIDS
    dataset also holds anatomical images), otherwise every NIfTI; `derivatives/` and
    `sourcedata/` are skipped unless the folder given is inside them, hidden files always.
    Tables (`*_timeseries.tsv|tsv.gz|csv|npy`) are taken as already-parcellated time x parcels
    series. What looks like a recording but cannot be read as one (a broken link, a folder, an
    upper-case extension, a parquet table) is returned with its problem, never left out unsaid;
    a file listed twice is read once.
    """
    recordings: list[Recording] = []
    listed: set = set()
    for item in [Path(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]:
        odd: list = []
        if item.is_dir():
            files, odd = _walk(item)
            nifti = [p for p in files if _is_nifti(p)]
            bold = [p for p in nifti if _strip_ext(p.name).endswith("_bold")]
            tables = [p for p in files if _is_timeseries(p)]
            chosen = (bold or nifti) + tables
            odd += [(p, why) for p in files if (why := _unreadable_name(p))]
            root = item
        elif item.is_file():
            chosen, root = [item], None
        else:
            raise InputError(item, "no such file or folder")
        for path, why in odd:
            ent, _ = _entities(path, root)
            recordings.append(Recording(path=path, subject="sub-" + ent.get("sub", "unknown"),
                                        entities=ent, problem=why))
        for path in chosen:
            real = path.resolve()
            if real in listed:  # the same file given twice (a folder and a file in it)
                continue
            listed.add(real)
            ent, clash = _entities(path, root)
            subject = "sub-" + ent.get("sub", _strip_ext(path.name).split("_")[0])
            subject = subject.replace("sub-sub-", "sub-")
            kind = "nifti" if _is_nifti(path) else "timeseries"
            bad = [f"{k}-{v}" for k, v in (("sub", subject[4:]), *ent.items())
                   if not _LABEL.fullmatch(v)]
            rec = Recording(path=path, subject=subject, session=ent.get("ses", ""),
                            task=ent.get("task", ""), run=ent.get("run", ""), entities=ent,
                            kind=kind, confounds=_confounds_for(path) if kind == "nifti" else None)
            if input_tr is not None:
                rec.tr, rec.tr_origin = input_tr, "user"
            else:
                rec.tr, rec.problem = _sidecar_tr(path)
                rec.tr_origin = "sidecar" if rec.tr is not None else "header"
            if bad and rec.problem is None:
                rec.problem = (f"BIDS label {bad[0]!r} holds characters other than letters "
                               "and digits: rename the file (labels are never cut or altered)")
            if clash and rec.problem is None:
                rec.problem = clash
            space = ent.get("space", "")
            if space and not space.upper().startswith("MNI") and rec.problem is None:
                rec.problem = (f"space-{space} is not an MNI space: use the MNI-space outputs "
                               "(the atlas is in MNI152)")
            recordings.append(rec)
    recordings.sort(key=lambda r: (r.recording_id, str(r.path)))
    seen: dict[str, Path] = {}
    for rec in recordings:  # the same run twice (say .nii and .nii.gz): keep the first
        if rec.problem is not None:
            continue
        if rec.recording_id in seen:
            rec.problem = f"duplicate recording {rec.recording_id} (also {seen[rec.recording_id]})"
        else:
            seen[rec.recording_id] = rec.path
    return recordings


def find_participants(inputs) -> Path | None:
    for item in [Path(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]:
        folder = item if item.is_dir() else item.parent
        if (folder / "participants.tsv").is_file():
            return folder / "participants.tsv"
    return None


def read_participants(path) -> tuple["object", dict[str, str], list[str]]:
    """The phenotype table keyed by BIDS subject id, {subject: problem} for bad rows, and
    warnings about the ids.

    Ids follow BIDS's label rule (`sub-` then letters and digits). An id without the prefix
    is read with it, and said; an id with other characters or none at all cannot name a
    recording, so its row is left out, and said. Duplicate ids cannot be joined safely (which
    age is right?), so those subjects are reported rather than guessed.
    """
    import io

    import pandas as pd

    path = Path(path)
    if not path.is_file():  # a folder or a pipe (which would wait forever)
        raise InputError(path, "not a regular file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        lines = [line for line in text.splitlines() if line.strip()]
        header = lines[0].split("\t") if lines else []
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:  # pandas would rename the second to age.1 and go on
            raise InputError(path, f"column {', '.join(map(repr, twice))} appears more than once")
        short = [i + 1 for i, line in enumerate(text.splitlines())
                 if line.strip() and line.count("\t") + 1 < len(header)]
        if short:  # pandas would pad them with missing values, unsaid
            raise InputError(path, f"line {short[0]} has fewer fields than the {len(header)} "
                             f"columns ({len(short)} such lines): write n/a for a missing value")
        table = pd.read_csv(io.StringIO(text), sep="\t", dtype={"participant_id": str},
                            na_values=["n/a"])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read the participants table ({exc})") from None
    if "participant_id" not in table.columns:
        raise InputError(path, "no 'participant_id' column (BIDS: the first column, "
                         f"tab-separated); columns: {', '.join(map(str, table.columns))}")
    raw = table["participant_id"]
    ids = raw.fillna("").astype(str).str.strip()
    warnings_: list[str] = []
    prefixed = ids.where(ids.str.startswith("sub-") | (ids == ""), "sub-" + ids)
    bad = ~prefixed.str.fullmatch(r"sub-[a-zA-Z0-9]+")
    bare = ids[(prefixed != ids) & ~bad]  # read with the prefix (the bad ones are left out)
    if len(bare):
        warnings_.append(f"{path}: {len(bare)} participant_id without the 'sub-' prefix read "
                         f"with it ({_examples(bare, lambda i: f'{i} as sub-{i}')})")
    ids = prefixed
    if bad.any():  # line numbers as in an editor: the header is line 1
        warnings_.append(f"{path}: {int(bad.sum())} row(s) left out, participant_id not a "
                         "BIDS label (sub- then letters and digits): " + _examples(
                             bad[bad].index, lambda i: f"line {i + 2} {raw[i]!r}"))
    table = table.assign(participant_id=ids)[~bad]
    dup = table["participant_id"][table["participant_id"].duplicated(keep=False)].unique()
    problems = {s: f"subject {s} appears {int((table['participant_id'] == s).sum())} times in "
                   f"{path}" for s in dup}
    table = table[~table["participant_id"].isin(dup)].set_index("participant_id")
    return table, problems, warnings_


def _examples(items, show, limit: int = 5) -> str:
    items = list(items)
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(show(i) for i in items[:limit]) + more


def attach_phenotypes(recordings: list[Recording], participants_path) -> list[str]:
    """Join phenotypes onto recordings; returns warnings (unknown subjects)."""
    if participants_path is None:
        return []
    table, problems, warnings_ = read_participants(participants_path)
    missing = False
    for rec in recordings:
        if rec.subject in problems and rec.problem is None:
            rec.problem = problems[rec.subject]
        elif rec.subject in table.index:
            row = table.loc[rec.subject]
            rec.phenotypes = {k: (None if _isna(v) else v) for k, v in row.items()}
        elif rec.problem is None:
            warnings_.append(f"{rec.path}: subject {rec.subject} is not in {participants_path}; "
                             "kept without phenotypes")
            missing = True
    unused = sorted(set(table.index) - {rec.subject for rec in recordings})
    if missing and unused:  # both sides unmatched: the ids are likely spelled differently
        warnings_.insert(0, f"{participants_path}: {len(unused)} participant_id match no recording "
                         f"({_examples(unused, str)}); ids must equal the file names' sub- "
                         "labels exactly (sub-1 is not sub-01)")
    return warnings_


def _isna(value) -> bool:
    try:
        return bool(np.isnan(value))
    except TypeError:
        return value is None
