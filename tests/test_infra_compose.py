"""infra/compose.yaml: valid for Compose (schema and interpolation checked by docker-compose
itself), refuses to start without each secret, every variable documented, health checks and
named volumes, least-privilege object-store users, and no secret in git."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.services import REPO, missing

INFRA = REPO / "infra"
COMPOSE_FILES = (INFRA / "compose.yaml", INFRA / "compose.gpu.yaml")
SECRET = re.compile(r"PASSWORD|SECRET|AUTH_STRING")
VAR = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


def _example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name] = value
    return pairs


def _secrets() -> list[str]:
    return [n for n in _example() if SECRET.search(n)]


def _compose_cmd() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        missing("docker-compose is not installed (Debian: apt-get install docker-compose)")
    return [exe, "--project-directory", str(INFRA), "-f", str(INFRA / "compose.yaml"),
            "-f", str(INFRA / "compose.gpu.yaml")]


def _generated_env(path: Path) -> Path:
    done = subprocess.run(["sh", str(INFRA / "make-env.sh"), str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return path


def _config(env_file: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*_compose_cmd(), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_compose_files_are_valid_with_generated_secrets(tmp_path):
    env_file = _generated_env(tmp_path / ".env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert all(re.fullmatch(r"(brainlm:)?[0-9a-f]{48}", values[n]) for n in _secrets())
    assert len({values[n] for n in _secrets()}) == len(_secrets())  # no reuse
    done = _config(env_file)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    mlflow = rendered["services"]["mlflow"]["environment"]
    assert mlflow["MLFLOW_AUTH"] == "1"
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"] == values["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql://mlflow:{values['MLFLOW_DB_PASSWORD']}@postgres:5432/mlflow")
    worker = rendered["services"]["prefect-worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # the worker logs as the non-admin MLflow user with the DVC user's S3 keys, not as root
    assert worker["environment"]["MLFLOW_TRACKING_USERNAME"] == values["BRAINLM_MLFLOW_USER"]
    assert worker["environment"]["AWS_ACCESS_KEY_ID"] == values["DVC_S3_ACCESS_KEY"]
    assert values["MINIO_ROOT_PASSWORD"] not in json.dumps(worker)
    # the checkout sits at the same path inside the worker: deployments record that path
    assert values["BRAINLM_WORKSPACE"] == str(REPO)
    assert worker["working_dir"] == str(REPO)
    owner = REPO.stat()
    expected = "10001:10001" if owner.st_uid == 0 else f"{owner.st_uid}:{owner.st_gid}"
    assert worker["user"] == expected  # the checkout's owner, never root

    # client.env for this machine carries the same credentials the worker (a client) uses
    client = dict(line.split("=", 1) for line in (tmp_path / "client.env").read_text()
                  .splitlines() if line and not line.startswith("#"))
    assert stat.S_IMODE((tmp_path / "client.env").stat().st_mode) == 0o600
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "PREFECT_API_AUTH_STRING", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert client[name] == worker["environment"][name], name
    assert client["BRAINLM_OPTUNA_STORAGE"] == worker["environment"][
        "BRAINLM_OPTUNA_STORAGE"].replace("@postgres:5432/", "@localhost:5432/")
    assert client["MLFLOW_TRACKING_URI"] == "http://localhost:5000"
    assert values["MLFLOW_AUTH_ADMIN_PASSWORD"] not in (tmp_path / "client.env").read_text()
    assert f"{REPO}:{REPO}:rw" in worker["volumes"] or f"{REPO}:{REPO}" in worker["volumes"]
    assert values["POSTGRES_PASSWORD"] not in json.dumps(rendered["services"]["mlflow"])


def test_make_env_never_overwrites(tmp_path):
    target = tmp_path / ".env"
    target.write_text("MLFLOW_AUTH_ADMIN_PASSWORD=kept\n")
    done = subprocess.run(["sh", str(INFRA / "make-env.sh"), str(target)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "not overwriting" in done.stderr
    assert target.read_text() == "MLFLOW_AUTH_ADMIN_PASSWORD=kept\n"


@pytest.mark.parametrize("name", [*_secrets(), "BRAINLM_WORKSPACE"])
def test_stack_refuses_to_start_without_each_secret(tmp_path, name):
    env_file = _generated_env(tmp_path / ".env")
    text = re.sub(rf"^{name}=.*$", f"{name}=", env_file.read_text(), flags=re.M)
    env_file.write_text(text)
    done = _config(env_file)
    assert done.returncode != 0 and name in done.stderr, done.stderr


def test_secrets_have_no_default_anywhere():
    text = "\n".join(p.read_text() for p in COMPOSE_FILES)
    uses = VAR.findall(text)
    assert uses
    for name, modifier in uses:
        if SECRET.search(name):
            assert modifier.startswith(":?"), f"{name} must be required (${{{name}:?...}})"
    assert all(value == "" for name, value in _example().items() if SECRET.search(name))
    client = (INFRA / "client.env.example").read_text()
    assert not re.search(r"^\w*(PASSWORD|SECRET|AUTH_STRING)=\S", client, re.M)


def test_every_variable_is_documented():
    readme = (INFRA / "README.md").read_text()
    example = _example()
    names = {n for p in COMPOSE_FILES for n, _ in VAR.findall(p.read_text())}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "BIND_ADDRESS", "PREFECT_AUTH_STRING"} <= names
    for name in sorted(names):
        assert name in example, f"{name} is missing from infra/.env.example"
        assert f"`{name}`" in readme, f"{name} is not documented in infra/README.md"
    client = [ln.split("=")[0] for ln in (INFRA / "client.env.example").read_text().splitlines()
              if ln and not ln.startswith("#")]
    for name in client:
        assert f"`{name}`" in readme, f"{name} (client.env.example) is not in infra/README.md"
    # the project's own variables among them are read by the code
    code = "\n".join(p.read_text() for p in [*(REPO / "brainlm").rglob("*.py"),
                                             *(REPO / "flows").glob("*.py")])
    for name in [n for n in client if n.startswith("BRAINLM_")]:
        assert name in code, f"{name} is documented but no code reads it"


def test_services_have_health_checks_named_volumes_and_loopback_ports():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    declared = set(compose["volumes"])
    used = set()
    for name, svc in services.items():
        one_shot = svc.get("restart") == "no"
        assert one_shot or "healthcheck" in svc, f"{name} has no health check"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            wanted = "service_completed_successfully" if services[dep].get("restart") == "no" \
                else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}"
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name}: {source} does not exist"
            elif not source.startswith("$"):
                used.add(source)
        if "build" in svc:
            assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert used == declared == {"pgdata", "minio-data", "worker-home"}
    assert services["mlflow"]["environment"]["MLFLOW_AUTH"] == "1"


def test_object_store_users_reach_only_their_bucket():
    buckets = {}
    for name in ("mlflow", "dvc"):
        policy = json.loads((INFRA / "minio" / f"policy-{name}.json").read_text())
        resources = {r for s in policy["Statement"] for r in s["Resource"]}
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        actions = {a for s in policy["Statement"] for a in s["Action"]}
        assert not any(a in ("s3:*", "*") or a.startswith("admin:") for a in actions)
        (bucket,) = {r.split(":::")[1].split("/")[0] for r in resources}
        buckets[name] = bucket
    assert buckets == {"mlflow": "mlflow-artifacts", "dvc": "brainlm-dvc"}
    compose = (INFRA / "compose.yaml").read_text()
    assert "s3://mlflow-artifacts/" in compose
    dvc = (REPO / ".dvc" / "config").read_text()
    assert "url = s3://brainlm-dvc/" in dvc


def test_minio_init_creates_buckets_and_users_without_root_keys_in_argv(tmp_path):
    """init.sh against a stand-in `mc` that logs its calls and, like mc, refuses to attach a
    policy twice: which calls, with which arguments, and a second run that still succeeds."""
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "$* | host=${MC_HOST_store:-}" >> "$MC_LOG"
        state="$MC_LOG.attached"
        touch "$state"
        case "$*" in
          "admin policy attach "*)
            grep -qx "$5 $7" "$state" && { echo "policy already attached" >&2; exit 1; }
            echo "$5 $7" >> "$state" ;;
          "admin policy entities "*)
            grep " $6\$" "$state" | cut -d" " -f1 ;;
        esac
    """))
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "MC_LOG": str(tmp_path / "log"),
           "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw123",
           "MLFLOW_S3_ACCESS_KEY": "mlflow", "MLFLOW_S3_SECRET_KEY": "m-secret",
           "DVC_S3_ACCESS_KEY": "dvc", "DVC_S3_SECRET_KEY": "d-secret"}
    for run in (1, 2):  # compose reruns it on every `up`
        done = subprocess.run(["sh", str(INFRA / "minio" / "init.sh")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"run {run}: {done.stderr}"
    calls = (tmp_path / "log").read_text().splitlines()
    argv = [c.split(" | ")[0] for c in calls]
    assert argv[0] == "mb --ignore-existing store/mlflow-artifacts store/brainlm-dvc"
    assert "admin user add store mlflow m-secret" in argv
    assert argv.count("admin policy attach store brainlm-dvc --user dvc") == 2
    assert "admin policy entities store --user dvc" in argv  # the second run checked
    assert (tmp_path / "log.attached").read_text().split("\n")[:2] == [
        "brainlm-mlflow mlflow", "brainlm-dvc dvc"]
    assert not any("rootpw123" in a for a in argv)
    assert all(c.endswith("host=http://root:rootpw123@minio:9000") for c in calls)
    env["DVC_S3_SECRET_KEY"] = ""
    refused = subprocess.run(["sh", str(INFRA / "minio" / "init.sh")], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "DVC_S3_SECRET_KEY is empty" in refused.stderr


def test_nothing_secret_is_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    if not tracked:
        pytest.fail("not a git checkout")
    env_files = [f for f in tracked if re.search(r"(^|/)\.?[\w.-]*\.env$|(^|/)\.env$", f)]
    assert env_files == [], env_files
    ignored = subprocess.run(["git", "check-ignore", "infra/.env", "infra/client.env"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["infra/.env", "infra/client.env"]
    # a secret-named variable given a literal value (not ${...}, not empty) in a tracked
    # configuration file (scripts compute theirs)
    literal = re.compile(r"\b([A-Z0-9_]*(?:PASSWORD|SECRET_KEY|SECRET|AUTH_STRING))\b['\"]?"
                         r"\s*(?:=|:\s)\s*['\"]?([^\s'\"]+)")
    for name in tracked:
        path = REPO / name
        if not name.startswith(("infra/", "mlflow/", ".dvc/")) or not path.is_file() \
                or path.suffix in (".md", ".sh", ".py"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            for var, value in literal.findall(line):
                assert value.startswith(("$", "{{")) or value in ("-", "|"), \
                    f"{name}: {var} has a literal value: {line.strip()}"
