"""The scheduled job (deployment `retrain/nightly`): refresh data, `dvc repro`, and let the
register stage promote the new models only if they beat the registry's champions on the same
test split. The decision is logged and returned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task


def _sh(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{res.stdout[-3000:]}\n"
                           f"{res.stderr[-3000:]}")
    return res.stdout + res.stderr


@task(retries=1, retry_delay_seconds=10)
def refresh_data(repo: Path) -> str:
    """New recordings: `dvc pull` of data/ when a remote holds them; on the demo profile the
    synthetic cohort is regenerated (byte-identical for the same params)."""
    from brainlm.jobs import load_params, run_stage

    params = load_params(repo / "params.yaml")
    if params["profile"] == "demo":
        run_stage("synth", params)
        return "synthetic data regenerated"
    return _sh(["dvc", "pull", "data.dvc"], repo)


@task
def reproduce(repo: Path) -> str:
    bin_dir = str(Path(sys.executable).parent)  # the brainlm command the stages call
    return _sh(["env", f"PATH={bin_dir}:" + subprocess.os.environ.get("PATH", ""), "dvc",
                "repro"], repo)


@flow(name="retrain")
def retrain(repo: str = ".", refresh: bool = True) -> dict:
    logger = get_run_logger()
    root = Path(repo).resolve()
    if refresh:
        logger.info(refresh_data(root))
    out = reproduce(root)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    logger.info("dvc repro ran: %s", ", ".join(ran) or "nothing (up to date)")
    decisions = decisions_now(root, ran)
    for model, d in decisions.items():
        logger.info("%s: %s (champion v%s)", model, d["decision"], d["champion_version"])
    return {"stages_run": ran, "decisions": decisions}


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
