"""Promotion in the model registry: a challenger replaces the champion only when it is shown
better on the VALIDATION subjects, paired, never on a point score and never on test.

Why: every nightly wave is compared with the champion on the same held-out subjects. Choosing
on test would make the champion's test score a maximum over noisy draws; choosing on a point
difference would swap champions on noise. So each version carries its evidence (per-subject
validation scores, or its validation predictions) as a tag, and a candidate is promoted only
when the paired bootstrap interval over the shared subjects of candidate minus champion lies
above 0. The `challenger` alias marks the best-scoring version on validation that is not the
champion, not the latest one.

Every decision is written in the order a kill at any call leaves decidable: the candidate's
score and evidence first, the aliases next, the decision tag last (a version without a decision
is decided again by the next `register`).
"""

from __future__ import annotations

import json
import math

from .errors import ConfigError
from .registry import CHALLENGER, CHAMPION, DECISION, _client, _number

EVIDENCE = "promotion.evidence"  # JSON; long evidence is split over EVIDENCE.0, .1, ...
CHUNK = 90_000  # under MLflow's 100,000-character limit for a model version tag
N_BOOT, SEED = 1000, 0  # the paired bootstrap of a promotion decision


# ---------------------------------------------------------------------------- evidence

def subject_scores(scores: dict) -> dict:
    """Evidence from one score per validation subject ({subject: value}; compared as the mean
    of per-subject differences)."""
    return {"kind": "subject_scores", "scores": {str(k): float(v) for k, v in scores.items()}}


def predictions(task: str, metric: str, classes, rows) -> dict:
    """Evidence from validation predictions: rows (recording_id, subject, y_true, prediction),
    the prediction a value (regression) or the class probabilities in `classes` order; the
    metric is recomputed on each resample of subjects."""
    return {"kind": "predictions", "task": task, "metric": metric,
            "classes": None if classes is None else [str(c) for c in classes],
            "rows": {str(r): [str(s), y, p] for r, s, y, p in rows}}


def write_evidence(client, name: str, version: str, evidence: dict) -> None:
    text = json.dumps(evidence, separators=(",", ":"))
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    if len(chunks) == 1:
        client.set_model_version_tag(name, version, EVIDENCE, text)
        return
    for i, chunk in enumerate(chunks):
        client.set_model_version_tag(name, version, f"{EVIDENCE}.{i}", chunk)
    client.set_model_version_tag(name, version, EVIDENCE, f"chunks:{len(chunks)}")


def read_evidence(version) -> dict | None:
    """A version's evidence, or None when it has none (or it cannot be read)."""
    tags = version.tags or {}
    text = tags.get(EVIDENCE)
    if not text:
        return None
    if text.startswith("chunks:"):
        try:
            text = "".join(tags[f"{EVIDENCE}.{i}"] for i in range(int(text[7:])))
        except (KeyError, ValueError):
            return None
    try:
        evidence = json.loads(text)
    except ValueError:
        return None
    return evidence if isinstance(evidence, dict) else None


def paired_difference(candidate: dict, champion: dict, higher_is_better: bool,
                      n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Interval of candidate minus champion (oriented: > 0 means the candidate is better) on the
    subjects both were scored on. Raises ValueError when they cannot be paired."""
    from .evaluate.intervals import mean_difference

    sign = 1.0 if higher_is_better else -1.0
    kinds = {candidate.get("kind"), champion.get("kind")}
    if kinds == {"subject_scores"}:
        a = {s: sign * v for s, v in candidate["scores"].items()}
        b = {s: sign * v for s, v in champion["scores"].items()}
        try:
            return mean_difference(a, b, n_boot=n_boot, seed=seed)
        except ConfigError as exc:  # no subject scored on both sides
            raise ValueError(str(exc)) from None
    if kinds != {"predictions"}:
        raise ValueError(f"evidence of kinds {sorted(map(str, kinds))} cannot be paired")
    same = ("task", "metric", "classes")
    if any(candidate.get(k) != champion.get(k) for k in same):
        raise ValueError("the champion's validation predictions are of another task, metric "
                         "or class list")
    return _paired_predictions(candidate, champion, sign, n_boot, seed)


def _paired_predictions(candidate: dict, champion: dict, sign: float, n_boot: int,
                        seed: int) -> dict:
    import numpy as np

    from .evaluate.intervals import paired_bootstrap
    from .evaluate.metrics import metric_fn

    shared = sorted(set(candidate["rows"]) & set(champion["rows"]))
    if not shared:
        raise ValueError("no validation recording was predicted by both")
    a = [candidate["rows"][r] for r in shared]
    b = [champion["rows"][r] for r in shared]
    if [(x[0], x[1]) for x in a] != [(x[0], x[1]) for x in b]:
        raise ValueError("the champion's validation recordings have other subjects or targets")
    task, classes = candidate["task"], candidate["classes"]
    metric = metric_fn(task, candidate["metric"], classes)
    y = np.array([x[1] for x in a], dtype=object if task == "classification" else np.float64)
    if task == "classification":
        y = y.astype(str)
    pa, pb = (np.asarray([x[2] for x in rows], dtype=np.float64) for rows in (a, b))
    out = paired_bootstrap(lambda t, p: sign * metric(t, p), y, pa, pb,
                           np.asarray([x[0] for x in a]), n_boot=n_boot, seed=seed)
    return out


# ---------------------------------------------------------------------------- aliases

def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
            return None
        raise


def _score(version, metric: str) -> float | None:
    try:
        return _number(float((version.tags or {}).get(f"metric.{metric}", "nan")))
    except ValueError:
        return None


def update_challenger(client, name: str, metric: str, higher_is_better: bool,
                      split: str | None) -> str | None:
    """Point `challenger` at the best-scoring version on validation (its `metric.<metric>`
    tag, on the same subjects) that is not the champion; the newest wins a tie. Recomputed
    from the tags every time, so a register stopped anywhere ends the same."""
    champion = alias_version(client, name, CHAMPION)
    current = None if champion is None else str(champion.version)
    best, best_value = None, None
    for v in client.search_model_versions(f"name = '{name}'"):
        value = _score(v, metric)
        if str(v.version) == current or value is None or \
                (split and (v.tags or {}).get("promotion.split") != split):
            continue
        key = (value if higher_is_better else -value, int(v.version))
        if best is None or key > best_value:
            best, best_value = str(v.version), key
    held = alias_version(client, name, CHALLENGER)
    held = None if held is None else str(held.version)
    if best is not None and best != held:
        client.set_registered_model_alias(name, CHALLENGER, best)
    elif best is None and held is not None:
        client.delete_registered_model_alias(name, CHALLENGER)
    return best


def record_score(client, name: str, version: str, metric: str, value: float,
                 higher_is_better: bool, split: str | None, evidence: dict | None) -> None:
    """The candidate's validation score, its subjects' key and its evidence, as tags."""
    tags = {f"metric.{metric}": value, "promotion.metric": metric,
            "promotion.higher_is_better": str(higher_is_better)}
    if split:
        tags["promotion.split"] = split
    for key, v in tags.items():
        client.set_model_version_tag(name, version, key, str(v))
    if evidence is not None:
        write_evidence(client, name, version, evidence)


def fmt_interval(d: dict) -> str:
    low, high = d.get("low", math.nan), d.get("high", math.nan)
    return f"{d['value']:+.4g} [{low:+.4g}, {high:+.4g}] ({d['verdict']})"


# ---------------------------------------------------------------------------- decisions

def note_decision(name: str, version, decision: str, reason: str, client=None) -> dict:
    """A decision that moves no alias by itself (`not_comparable`), written on the version with
    its reason; the decision tag last, so a version without one is decided again."""
    from .registry import champion_version

    client = _client(client)
    version = str(version)
    client.set_model_version_tag(name, version, "promotion.reason", reason[:5000])
    client.set_model_version_tag(name, version, DECISION, decision)
    return {"decision": decision, "champion_version": champion_version(name, client),
            "candidate_version": version, "reason": reason}


def hold_back(name: str, version, decision: str, reason: str, client=None, *,
              metric: str | None = None, value=None, higher_is_better: bool = True,
              split: str | None = None, evidence: dict | None = None) -> dict:
    """A candidate that may not become champion (not shown above its baseline). Its score is
    recorded, so it is the `challenger` when it is the best version that is not champion; the
    champion stays."""
    client = _client(client)
    version = str(version)
    value = _number(value)
    if metric and value is not None:
        record_score(client, name, version, metric, value, higher_is_better, split, evidence)
        update_challenger(client, name, metric, higher_is_better, split)
    elif alias_version(client, name, CHALLENGER) is None:
        client.set_registered_model_alias(name, CHALLENGER, version)
    return note_decision(name, version, decision, reason, client)


def promote(name: str, version, metric: str, value: float, higher_is_better: bool,
            client=None, split: str | None = None, evidence: dict | None = None,
            n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Make `version` the champion when there is none, or when the paired interval over the
    shared validation subjects of its score minus the champion's lies above 0 (`evidence`:
    `subject_scores` or `predictions`, recorded on both versions). Raises ValueError when the
    two cannot be compared: another split key (`split`: atlas, target, task and subjects), a
    champion without a recorded score or evidence, evidence that cannot be paired.

    Returns {"decision": "promoted" | "kept_champion", "champion_version" (after), "candidate_
    version", "candidate_value", "champion_value", "compared_with", "difference" (the paired
    interval: value, low, high, verdict; None without a champion)}."""
    value = _number(value)
    if value is None:
        raise ValueError(f"{metric} of candidate {name} v{version} must be a finite number")
    client = _client(client)
    version = str(version)
    client.get_model_version(name, version)  # fails early for an unknown version
    champion = alias_version(client, name, CHAMPION)
    # versions are ints from the SQLite store of MLflow 3.17 and strings elsewhere: use str
    current = None if champion is None else str(champion.version)
    compared_with = current if current != version else None
    champion_value = diff = None
    if compared_with is not None:
        diff, champion_value = _against(champion, name, metric, evidence, higher_is_better,
                                        split, n_boot, seed)
    promoted = diff is None or diff["verdict"] == "better"
    decision = "promoted" if promoted else "kept_champion"
    # a kill at any call leaves this decidable: score and evidence first, aliases next,
    # the decision last (a version without a decision is decided again)
    record_score(client, name, version, metric, value, higher_is_better, split, evidence)
    tags = {"promotion.compared_with": compared_with or "none",
            "promotion.candidate_value": value,
            "promotion.champion_value": "none" if champion_value is None else champion_value}
    if diff is not None:
        tags.update({"promotion.difference": fmt_interval(diff),
                     "promotion.verdict": diff["verdict"]})
    for key, v in tags.items():
        client.set_model_version_tag(name, version, key, str(v))
    if promoted:
        if compared_with is not None:
            client.set_model_version_tag(name, compared_with, "promotion.replaced_by", version)
        client.set_registered_model_alias(name, CHAMPION, version)
    update_challenger(client, name, metric, higher_is_better, split)
    client.set_model_version_tag(name, version, DECISION, decision)
    return {"decision": decision, "champion_version": version if promoted else current,
            "candidate_version": version, "candidate_value": value,
            "champion_value": champion_value, "compared_with": compared_with,
            "difference": diff}


def _against(champion, name: str, metric: str, evidence, higher_is_better: bool, split,
             n_boot: int, seed: int):
    """(the paired interval of candidate minus champion, the champion's score); ValueError
    when they are not comparable."""
    current = str(champion.version)
    champion_value = _score(champion, metric)
    if champion_value is None:
        raise ValueError(f"champion {name} v{current} has no finite tag metric.{metric}: "
                         "score it on the same validation subjects before promoting against it")
    theirs = (champion.tags or {}).get("promotion.split")
    if split and theirs and theirs != split:
        raise ValueError(f"champion {name} v{current} was scored on {theirs!r}, the candidate "
                         f"on {split!r} (atlas, target, task or validation subjects differ): "
                         "not comparable")
    theirs_evidence = read_evidence(champion)
    if evidence is None or theirs_evidence is None:
        who = "the candidate" if evidence is None else f"champion {name} v{current}"
        raise ValueError(f"{who} has no per-subject validation evidence "
                         f"({EVIDENCE}): no paired comparison can be made")
    return paired_difference(evidence, theirs_evidence, higher_is_better, n_boot, seed), \
        champion_value
