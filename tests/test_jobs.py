"""The jobs layer: one table of stages, one default per setting, one way to be tracked, and the
library's size rules (modules <= 500 lines, functions <= 80, an opening docstring each)."""

from __future__ import annotations

import re

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from brainlm.cli import JOB_COMMANDS, build_parser
from brainlm.errors import ConfigError
from brainlm.jobs import JOBS, job, load_params, run_stage
from brainlm.jobs.options import default, from_args, from_block

ROOT = Path(__file__).resolve().parents[1]


def test_stage_names_are_written_once():
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages == [n for n in JOBS if n != "synth"]  # synth writes data/ (data.dvc)
    stage = build_parser()._subparsers._group_actions[0].choices["stage"]
    choices = next(a.choices for a in stage._actions if a.dest == "name")
    assert list(choices) == list(JOBS)
    for name, cmd in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = cmd.get("do", cmd)
        assert body["cmd"].startswith(f"brainlm stage {name}")
        assert f"brainlm/jobs/{name}.py" in body["deps"]  # the job's own module reruns it


def test_every_per_ratio_plot_follows_params_mask_ratios():
    """dvc.yaml's top-level plots name one file per mask ratio (DVC cannot loop there): they
    must be params.yaml's ratios, or `dvc plots show` reports missing files."""
    ratios = {f"{r:g}" for r in yaml.safe_load((ROOT / "params.yaml").read_text())["mask_ratios"]}
    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(plot, dict):
            (props,) = plot.values()
            files = props["y"] if isinstance(props["y"], dict) else {}
            named = {f.split("pretrain-")[1].split("/")[0] for f in files if "pretrain-" in f}
            assert not named or named == ratios, (plot, named, ratios)


def test_tune_study_key_follows_the_code_dvc_reruns_the_stage_for():
    from brainlm.jobs.tune import CODE

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tune"]["deps"]
    assert sorted(d[len("brainlm/"):] for d in deps if d.startswith("brainlm/")) == sorted(CODE)


def _leaves(cls, prefix: str = "") -> set:
    """Dotted paths of a config's settings (nested config dataclasses opened up)."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


@pytest.mark.parametrize("name", list(JOB_COMMANDS))
def test_every_setting_is_a_flag_with_the_dataclass_default(name):
    import importlib

    mod = importlib.import_module(f"brainlm.jobs.{JOB_COMMANDS[name][0]}")
    paths = {o.path for o in mod.OPTIONS}
    fields = _leaves(mod.Config)
    assert fields - paths == set(mod.NOT_OPTIONS), "settings without a flag"
    assert paths <= fields
    # no flag given: every setting is the dataclass default
    parser = build_parser(only=name)
    required = [a for a in parser._subparsers._group_actions[0].choices[name]._actions
                if a.required]
    argv = [name]
    for action in required:
        argv += [action.option_strings[0], "x"]
    args = parser.parse_args(argv)
    cfg = from_args(mod.Config, mod.OPTIONS, args)
    for option in mod.OPTIONS:
        value = default(mod.Config, option.path)
        if value is not dataclasses.MISSING:
            got = cfg
            for part in option.path.split("."):
                got = getattr(got, part)
            assert got == value, option.path


@pytest.mark.parametrize("profile", ["demo", "gpu"])
def test_every_params_block_builds_its_job_config(profile, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = profile
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    for name in JOBS:
        mod = job(name)
        if name == "tune":
            continue  # its study key hashes the store and the model: checked below
        cfg = mod.from_params(params, tmp_path, 0.75) if name == "pretrain" else \
            mod.from_params(params, tmp_path)
        assert isinstance(cfg, mod.Config)
    pre = job("pretrain").from_params(params, tmp_path, 0.2)
    assert pre.mask_ratio == 0.2 and pre.out == tmp_path / "models" / "pretrain-0.2"
    assert pre.max_steps == raw[profile]["pretrain"]["max_steps"]
    ft = job("finetune").from_params(params, tmp_path)
    assert ft.model == tmp_path / "models" / f"pretrain-{raw['finetune_mask_ratio']:g}"


def test_tune_stage_config_keeps_the_params_study_name(tmp_path, monkeypatch):
    from brainlm.jobs import tune

    monkeypatch.setattr(tune, "study_key", lambda cfg, params: "k")
    params = load_params(ROOT / "params.yaml")
    cfg = tune.from_params(params, tmp_path)
    assert cfg.study == f"{params['tune']['study']}-k"
    assert cfg.n_trials == params["tune"]["n_trials"] and cfg.total
    assert cfg.base.out == tmp_path / "runs" / "tune" and cfg.base.lr == params["finetune"]["lr"]


def test_command_line_and_params_give_the_same_config(tmp_path):
    """`brainlm finetune` with the demo block's values as flags == the finetune stage's config."""
    params = load_params(ROOT / "params.yaml")
    stage_cfg = job("finetune").from_params(params, tmp_path)
    argv = ["finetune", "--model", str(stage_cfg.model), "--data", str(stage_cfg.data), "--out",
            str(stage_cfg.out), "--no-progress"]
    for key, value in params["finetune"].items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    mod = job("finetune")
    cli_cfg = from_args(mod.Config, mod.OPTIONS, build_parser(only="finetune").parse_args(argv))
    assert cli_cfg == stage_cfg


@pytest.mark.parametrize("block,message", [
    ({"max_steps": 0}, "max_steps: 0 must be >= 1"),
    ({"mask_ratio": 1.5}, "mask_ratio: 1.5 must be <= 1"),
    ({"max_stpes": 10}, "unknown setting 'max_stpes'"),
    ({"lr": float("nan")}, "not a finite number"),
    # YAML gives values as written: each must be of its setting's type, never passed on
    ({"window": "fifty"}, r"window: 'fifty' is not a whole number"),
    ({"batch_size": 8.5}, "batch_size: 8.5 is not a whole number"),
    ({"window": True}, "window: True is not a whole number"),
    ({"compile": "no"}, "compile: 'no' is not true or false"),
    ({"lr": "1e-3"}, "lr: '1e-3' is not a number"),
    ({"profile": 13}, "profile: 13 is not text"),
    # a key the pipeline sets itself would be silently replaced: refused
    ({"out": "/tmp/elsewhere"}, "pretrain.out: set by the pipeline for this stage"),
])
def test_bad_params_values_are_named(block, message, tmp_path):
    mod = job("pretrain")
    with pytest.raises(ConfigError, match=message):
        from_block(mod.Config, mod.OPTIONS, block, "pretrain",
                   fixed={"data": tmp_path, "out": tmp_path})


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["demo"]["preprocess"].pop("window"), None),  # its default, as preprocess
    (lambda p: p["demo"]["preprocess"].update(window="fifty"),
     "preprocess.window: 'fifty' is not a whole number"),
    (lambda p: p["demo"]["preprocess"].update(split="0.6,0.2,0.2"), None),  # as the flag
    (lambda p: p["demo"]["preprocess"].update(split=[0.6, "a", 0.2]), "not a list of numbers"),
    (lambda p: p["demo"]["synth"].update(tr=2.0), "synth.tr: set by the pipeline for this stage (to 0.735)"),
    (lambda p: p.update(profile=["demo"]), "profile ['demo'] has no block"),
    (lambda p: p.update(mask_ratios=[0.2, "x"]), "mask_ratios must be a list of different"),
    (lambda p: p.update(finetune_mask_ratio=0.5), "finetune_mask_ratio 0.5 must be one of"),
])
def test_every_stage_reads_other_blocks_as_their_own_stage_does(edit, message, tmp_path):
    """synth and validate take settings from preprocess's block: checked as preprocess checks
    them (a missing key is its default, a wrong one is named), for every stage alike."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    for stage in ("synth", "validate") if "synth." not in (message or "") else ("synth",):
        if message is None:
            job(stage).from_params(load_params(path), tmp_path)
        else:
            with pytest.raises(ConfigError, match=re.escape(message)):
                job(stage).from_params(load_params(path), tmp_path)


def test_params_file_faults_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\ndemo:\n  synth: {subjects: 4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+") as err:
        load_params(path)
    assert "\n" not in str(err.value)
    path.write_bytes(b"profile: d\xe9mo\n")
    with pytest.raises(ConfigError, match="cannot read pipeline settings"):
        load_params(path)


def test_bad_flags_are_named(capsys):
    from brainlm.cli import main

    assert main(["pretrain", "--data", "d", "--out", "o", "--max-steps", "0"]) == 2
    assert "--max-steps: 0 must be >= 1" in capsys.readouterr().err
    assert main(["stage", "validate", "--mask-ratio", "0.2", "--params",
                 str(ROOT / "params.yaml")]) == 2
    assert "takes no --mask-ratio" in capsys.readouterr().err


def test_help_builds_no_job(tmp_path):
    code = ("import sys; from brainlm.cli import main\n"
            "assert main(['--help']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('brainlm.jobs.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_a_job_is_tracked_the_same_way_from_the_cli_and_as_a_stage(tmp_path, monkeypatch,
                                                                  atlas_spec):
    """synth (the cheapest job) run as `brainlm synth` and as `brainlm stage synth`: one run
    each in experiment `synth`, the same params, metrics and job tag; only the caller differs."""
    from brainlm.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    assert main(["synth", "--out", str(tmp_path / "cli"), "--subjects", "2", "--timepoints",
                 "30", "--atlas", atlas_spec, "--voxel-size", "8"]) == 0
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["demo"]["synth"] = {"subjects": 2, "timepoints": 30, "seed": 0, "voxel_size": 8}
    raw["demo"]["preprocess"]["atlas"] = atlas_spec
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    run_stage("synth", load_params(tmp_path / "params.yaml"))
    runs = _runs(uri, "synth")
    assert len(runs) == 2
    by_caller = {r.data.tags["brainlm.caller"]: r for r in runs}
    cli, stage = by_caller["cli"], by_caller["stage"]
    assert set(cli.data.params) == set(stage.data.params) >= {"subjects", "timepoints", "tr"}
    assert cli.data.metrics == stage.data.metrics == {"recordings": 2.0}
    assert cli.data.tags["brainlm.job"] == stage.data.tags["brainlm.job"] == "synth"
    assert stage.data.tags["brainlm.profile"] == "demo"
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_failing_job_leaves_a_failed_run(tmp_path, monkeypatch):
    from brainlm.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) != 0
    runs = _runs(uri, "evaluate")
    assert [r.info.status for r in runs] == ["FAILED"]


# ---------------------------------------------------------------------------- size rules


def _library_files():
    return sorted((ROOT / "brainlm").rglob("*.py"))


def test_modules_and_functions_stay_small_and_say_what_they_hold():
    problems = []
    for path in _library_files():
        source = path.read_text()
        tree = ast.parse(source)
        rel = path.relative_to(ROOT)
        if len(source.splitlines()) > 500:
            problems.append(f"{rel}: {len(source.splitlines())} lines")
        doc = ast.get_docstring(tree)
        if not doc or "later work" in doc.lower():
            problems.append(f"{rel}: no opening docstring saying what it holds")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not problems, "\n".join(problems)


def test_the_library_imports_no_orchestrator():
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("prefect", "dvc"), f"{path}: imports {name}"


def test_tracked_params_hide_passwords_fit_mlflow_and_nest_under_a_callers_run(tmp_path):
    import mlflow

    from brainlm.tracking import MAX_PARAM, job_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {"storage": "postgresql://brainlm:s3cret@db:5432/optuna",
              "inputs": [f"/data/sub-{i:04d}_bold.nii.gz" for i in range(600)]}
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name="caller") as caller:
        with job_run("tune", "study", config, uri=uri) as tracker:
            run_id = tracker.run_id
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["storage"] == "postgresql://brainlm:***@db:5432/optuna"
    assert len(run.data.params["inputs"]) <= MAX_PARAM and "chars)" in run.data.params["inputs"]
    assert run.data.tags["mlflow.parentRunId"] == caller.info.run_id
    assert run.info.status == "FINISHED" and mlflow.active_run() is None


def test_register_settings_are_typed_like_every_stage(tmp_path):
    """gate: 'false' (text) was read as true."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["demo"]["register"]["gate"] = "false"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="register.gate: 'false' is not true or false"):
        job("register").from_params(load_params(tmp_path / "params.yaml"), tmp_path)
    raw["demo"]["register"]["gate"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert job("register").from_params(load_params(tmp_path / "params.yaml"),
                                       tmp_path).gate is False
