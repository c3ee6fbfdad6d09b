"""The scheduled job (deployment `retrain/nightly`): new data, then every pipeline stage as its
own Prefect task (`dvc repro --single-item STAGE`, in dvc.yaml's order, so DVC still skips what
did not change), their output streamed live into the task's log, and a markdown artifact
(`retrain`): the data wave, the stages run, the metrics that changed (as `dvc metrics diff`)
and the registry's decisions. Orchestration only: the work is `brainlm stage` under DVC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task


def _stream(cmd: list[str], cwd: Path) -> str:
    """Run `cmd`, every output line into the run's log as it comes; the output, or an error
    with its tail."""
    logger = get_run_logger()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",  # lines, not bars
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n"
                           + "\n".join(lines[-40:]))
    return "\n".join(lines)


@task(retries=1, retry_delay_seconds=10, log_prints=True)  # synth's atlas line in the log
def refresh_data(repo: Path) -> str:
    """New recordings. Demo profile: a new wave of synthetic training subjects (seed + wave,
    recorded in participants.tsv and the synth run), the validation and test subjects
    unchanged, versioned with `dvc add data`. Other profiles: `dvc pull` of data/."""
    from dataclasses import replace

    from brainlm.jobs import load_params, synth

    params = load_params(repo / "params.yaml")
    if params["profile"] != "demo":
        _stream(["dvc", "pull", "data.dvc"], repo)
        return "data/ pulled from the DVC remote"
    cfg = synth.from_params(params, repo)
    cfg = replace(cfg, wave=max(1, synth.next_wave(cfg.out)))
    values = synth.run(cfg, tags={"brainlm.profile": params["profile"],
                                  "brainlm.caller": "prefect"})
    _stream(["dvc", "add", "data"], repo)
    return (f"synthetic wave {cfg.wave} (seed {cfg.seed + cfg.wave}): {values['recordings']} "
            "recordings, new training subjects, the same validation and test subjects")


def stage_names(repo: Path) -> list[str]:
    """dvc.yaml's stages in order (brainlm.jobs.JOBS, which a test holds equal to dvc.yaml),
    per-item stages expanded as DVC names them (`pretrain@0.75`)."""
    from brainlm.jobs import JOBS, PER_ITEM, load_params

    params = load_params(repo / "params.yaml")
    names = []
    for name in JOBS:
        if name == "synth":  # data/, versioned by data.dvc
            continue
        items = params[PER_ITEM[name]] if name in PER_ITEM else [None]
        names += [name if item is None else f"{name}@{item}" for item in items]
    return names


@task(task_run_name="dvc repro {stage}")
def repro_stage(repo: Path, stage: str) -> bool:
    """One stage through DVC: True when it ran, False when DVC found it up to date."""
    out = _stream(["dvc", "repro", "--single-item", stage], repo)
    return f"Running stage '{stage}'" in out


def metrics_now(repo: Path) -> dict:
    """{(file, metric): value} of every metric dvc.yaml declares (`dvc metrics show`)."""
    res = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, capture_output=True,
                         text=True)
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    flat = {}

    def walk(path, prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(path, f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            flat[(path, prefix)] = value

    shown = json.loads(res.stdout)  # {rev: {"data": {file: {"data": {...}}}}}, one rev here
    for path, entry in next(iter(shown.values()), {}).get("data", {}).items():
        walk(path, "", entry.get("data", {}))
    return flat


def metrics_diff(before: dict, after: dict) -> str:
    """Markdown like `dvc metrics diff --md`: the metrics whose value changed."""
    rows = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "-"), after.get(key, "-")
        if old == new or (old != old and new != new):  # NaN stays NaN: unchanged
            continue
        change = (f"{new - old:+.4g}" if all(isinstance(v, (int, float)) for v in (old, new))
                  else "")
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        rows.append(f"| {key[0]} | {key[1]} | {fmt(old)} | {fmt(new)} | {change} |")
    if not rows:
        return "No metric changed.\n"
    return ("| Path | Metric | Before | After | Change |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def report(data: str, ran: list[str], diff: str, decisions: dict) -> str:
    lines = ["# Nightly retrain", "", f"- data: {data}",
             f"- stages run: {', '.join(ran) or 'none (everything up to date)'}", "",
             "## Metrics changed", "", diff, "## Registry decisions", "",
             "| Model | Decision | Champion version |", "|---|---|---|"]
    lines += [f"| {m} | {d['decision']} | {d.get('champion_version')} |"
              for m, d in decisions.items()]
    return "\n".join(lines) + "\n"


@flow(name="retrain")
def retrain(repo: str = ".", refresh: bool = True) -> dict:
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    root = Path(repo).resolve()
    before = metrics_now(root)
    data = refresh_data(root) if refresh else "not refreshed"
    logger.info("data: %s", data)
    ran = [stage for stage in stage_names(root) if repro_stage(root, stage)]
    logger.info("dvc repro ran: %s", ", ".join(ran) or "nothing (up to date)")
    decisions = decisions_now(root, ran)
    for model, d in decisions.items():
        logger.info("%s: %s (champion v%s)", model, d["decision"], d["champion_version"])
    diff = metrics_diff(before, metrics_now(root))
    create_markdown_artifact(key="retrain", markdown=report(data, ran, diff, decisions),
                             description="nightly retrain: data, stages, metrics, decisions")
    return {"data": data, "stages_run": ran, "decisions": decisions}


def decisions_now(root: Path, ran: list[str]) -> dict:
    """This run's registry decisions: metrics/register.json when the register stage ran;
    otherwise nothing was decided, so every model is `unchanged` with the registry's current
    champion (never the last run's stale "promoted")."""
    from brainlm.registry import champion_version

    decisions = json.loads((root / "metrics" / "register.json").read_text())
    if "register" in ran:
        return decisions
    return {key: {"decision": "unchanged",
                  "champion_version": str(champion_version(key.split("@")[0]))}
            for key in decisions}
