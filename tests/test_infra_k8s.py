"""Kubernetes deliverables in infra/: manifests against the Kubernetes schemas (strict), the
Prefect work pool template through prefect-kubernetes' own rendering code, the Helm values
against the prefect-worker chart's keys, the torchrun Job's internal consistency (parsed by
torch's own launcher parser and our CLI's), and the Dockerfile's install order. Offline."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
TEMPLATE = K8S / "work-pool-gpu.json"
VALUES = K8S / "prefect-worker-values.yaml"
TORCHRUN = K8S / "pretrain-torchrun.yaml"
README = K8S / "README.md"
POOL = "brainlm-k8s-gpu"
# Newest schema set kubernetes-validate 1.37.0 ships; strict = unknown fields are errors.
K8S_VERSION = "1.37.0"
# Fields Prefect's job-manifest validator insists on inside the *pod* spec (prefect-kubernetes'
# _get_base_job_manifest); they are not PodSpec fields, and the API server drops them with a
# warning (default fieldValidation=Warn), so strict validation is run without them.
PREFECT_POD_SPEC_EXTRAS = {"parallelism": 1, "completions": 1}


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path == VALUES:  # Helm values, not a Kubernetes object
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc.get('kind')}/{doc['metadata']['name']}", doc))
    return docs


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.M)
    return int(users[-1].split(":")[0])


# ---------------------------------------------------------------------------- manifests


def test_every_manifest_validates_strictly():
    docs = _manifests()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["Job", "PersistentVolumeClaim", "Service"], kinds
    for name, doc in docs:
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as exc:  # name the failing object
            pytest.fail(f"{name}: {exc.message}")


def test_strict_validation_rejects_unknown_fields():
    """The validation above can fail: a misplaced field is an error, not silently dropped."""
    job = copy.deepcopy(next(d for _, d in _manifests() if d["kind"] == "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


# ---------------------------------------------------------------------------- work pool


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _render(values: dict) -> dict:
    """The worker's path: variables + job variables -> configuration -> per-flow-run manifest."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    class NoAPI:  # the template must not need the Prefect API (blocks, variables) to render
        def __getattr__(self, name):
            raise AssertionError(f"template rendering called the API: {name}")

    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        _template(), values, client=NoAPI()))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="gpu-test-run"))
    return config.job_manifest


def _pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def test_template_extends_the_installed_default():
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    tpl = _template()
    assert set(default["variables"]["properties"]) < set(tpl["variables"]["properties"])
    assert set(default["job_configuration"]) == set(tpl["job_configuration"])
    container = _pod_spec(tpl["job_configuration"]["job_manifest"])["containers"][0]
    # Prefect fills these per flow run; losing them breaks flow execution
    assert container["name"] == "prefect-job"
    assert container["env"] == "{{ env }}" and container["args"] == "{{ command }}"
    gpus = tpl["variables"]["properties"]["gpus"]
    assert gpus["type"] == "integer" and gpus["default"] == 1


def test_template_passes_the_servers_work_pool_check():
    """What `prefect work-pool create --base-job-template` sends: every placeholder declared."""
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=_template())
    broken = _template()
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "priorityClassName"] = "{{ priority_class }}"
    with pytest.raises(ValueError, match="priority_class"):
        WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=broken)


def test_job_variables_are_checked_against_the_schema():
    """The server validates a deployment's job variables with this schema."""
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = _template()["variables"]
    validate({"gpus": 4, "shm_size": "16Gi"}, schema, raise_on_error=True)
    for bad in ({"gpus": -1}, {"gpus": "four"}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True)


@pytest.mark.parametrize("values, gpus", [({"gpus": 4}, 4), ({}, 1)])
def test_rendered_job_requests_gpus_and_validates(values, gpus):
    manifest = _render(values)
    spec = _pod_spec(manifest)
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert container["image"] == "ghcr.io/OWNER/brainlm:latest"
    assert container["envFrom"] == [{"secretRef": {"name": "brainlm-env"}}]
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in container["env"])  # Prefect's env kept
    shm = {v["name"]: v for v in spec["volumes"]}[
        {m["mountPath"]: m for m in container["volumeMounts"]}["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == _dockerfile_uid()
    assert manifest["metadata"]["namespace"] == "brainlm"

    for key, value in PREFECT_POD_SPEC_EXTRAS.items():
        assert spec.pop(key) == value
    _validate(manifest)


def test_rendered_job_follows_overrides():
    manifest = _render({"gpus": 0, "env_secret_name": "other-env", "shm_size": "1Gi",
                        "namespace": "ml", "memory_limit": "64Gi"})
    spec = _pod_spec(manifest)
    container = spec["containers"][0]
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 0}
    assert container["envFrom"][0]["secretRef"]["name"] == "other-env"
    assert spec["volumes"][0]["emptyDir"]["sizeLimit"] == "1Gi"
    assert manifest["metadata"]["namespace"] == "ml"


# ---------------------------------------------------------------------------- helm values

# Keys of the prefect-worker chart (2025.3+, after serverApiConfig became
# selfHostedServerApiConfig) that this file may use; a typo would be silently ignored by Helm
# where the chart's schema allows extra keys, so it is caught here.
CHART_WORKER_KEYS = {
    "autoscaling", "clusterUid", "initContainer", "image", "config", "apiConfig",
    "cloudApiConfig", "selfManagedCloudApiConfig", "selfHostedServerApiConfig",
    "revisionHistoryLimit", "replicaCount", "resources", "livenessProbe", "podSecurityContext",
    "priorityClassName", "containerSecurityContext", "podLabels", "podAnnotations", "affinity",
    "nodeSelector", "tolerations", "extraEnvVars", "extraEnvVarsCM", "extraEnvVarsCMs",
    "extraEnvVarsSecret", "extraEnvVarsSecrets", "extraContainers", "extraVolumes",
    "extraVolumeMounts", "extraArgs", "dnsPolicy", "dnsConfig"}
CHART_CONFIG_KEYS = {"workPool", "workQueues", "queryInterval", "prefetchSeconds", "http2",
                     "type", "installPolicy", "name", "limit", "baseJobTemplate"}


def test_helm_values_carry_the_template_and_the_chart_keys():
    import prefect

    values = yaml.safe_load(VALUES.read_text())
    assert set(values) == {"worker"}
    worker = values["worker"]
    assert set(worker) <= CHART_WORKER_KEYS, set(worker) - CHART_WORKER_KEYS
    assert worker["apiConfig"] == "selfHostedServer"
    assert set(worker["selfHostedServerApiConfig"]) <= {"apiUrl", "basicAuth"}
    assert re.fullmatch(r"https?://[^/\s]+/api", worker["selfHostedServerApiConfig"]["apiUrl"])
    config = worker["config"]
    assert set(config) <= CHART_CONFIG_KEYS
    assert config["workPool"] == POOL and config["type"] == "kubernetes"
    # the chart's schema types it as a JSON string (it renders it into a ConfigMap with toJson)
    configuration = config["baseJobTemplate"]["configuration"]
    assert isinstance(configuration, str)
    assert json.loads(configuration) == _template()
    # the worker runs the same Prefect as the flow runs
    assert worker["image"]["prefectTag"].startswith(f"{prefect.__version__}-")


# ---------------------------------------------------------------------------- torchrun job


def _torchrun_objects() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(TORCHRUN.read_text())}


def test_torchrun_job_is_consistent():
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes

    from brainlm.cli import build_parser

    objs = _torchrun_objects()
    job, svc, pvc = objs["Job"], objs["Service"], objs["PersistentVolumeClaim"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "torchrun"
    launch = get_args_parser().parse_args(container["args"][1:])

    # rendezvous at pod 0 of the Indexed Job, reached through the headless Service
    assert spec["completionMode"] == "Indexed"
    assert launch.rdzv_backend == "c10d"
    host, port = launch.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert launch.rdzv_id
    init = pod["initContainers"][0]
    assert host in " ".join(init["command"])  # waits for the very name torchrun dials

    # the shape: one pod per node, all nodes at once, one process per GPU
    min_nodes, max_nodes = parse_min_max_nnodes(launch.nnodes)
    assert min_nodes == max_nodes == spec["parallelism"] == spec["completions"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(launch.nproc_per_node) == gpus == container["resources"]["requests"][
        "nvidia.com/gpu"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()

    # what every rank runs: our CLI, with flags it really has
    assert launch.no_python and launch.training_script == "brainlm"
    args = build_parser().parse_args(launch.training_script_args)
    assert args.command == "pretrain"
    assert (args.profile, args.mask_ratio, args.resume) == ("13m", 0.75, True)
    assert args.batch_size % (max_nodes * gpus) == 0  # PretrainConfig.validate would refuse

    # volumes: data/models on the shared claim, /dev/shm in memory, env from the secret
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[mounts["/mnt/brainlm"]]
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert str(args.data).startswith("/mnt/brainlm/") and str(args.out).startswith("/mnt/brainlm/")
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert container["envFrom"] == [{"secretRef": {"name": "brainlm-env"}}]
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]


# ---------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2)) for m in
            re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_dockerfile_installs_cuda_torch_before_the_project():
    steps = _instructions()
    runs = [(i, args) for i, (ins, args) in enumerate(steps) if ins == "RUN"]
    torch_step = next(i for i, a in runs
                      if re.search(r"--index-url\s+\S*download\.pytorch\.org/whl/\$\{?TORCH_CUDA",
                                   a) and "torch==" in a)
    project_step = next(i for i, a in runs if "'.[team,cluster]'" in a)
    assert torch_step < project_step
    assert re.search(r"pip install -c \S+ '\.\[team,cluster\]'", steps[project_step][1])
    copies = [i for i, (ins, a) in enumerate(steps) if ins == "COPY" and "constraints.txt" in a]
    assert copies and copies[0] < torch_step
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for ins, a in steps
                if ins == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0" and re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"])


def test_dockerfile_constraints_accept_the_cuda_wheel(tmp_path):
    """A lock regenerated by `pip freeze` on the CPU machines pins torch==2.13.0+cpu, which a
    +cuXXX wheel does not satisfy: the sed in the Dockerfile must turn the lock's torch pin
    (labelled or not) into one the CUDA build satisfies, and change nothing else."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    text = DOCKERFILE.read_text()
    expr = re.search(r"sed -E ('[^']*')", text).group(1)
    args = dict(re.findall(r"^ARG (TORCH_\w+)=(\S+)", text, re.M))
    cuda = Version(f"{args['TORCH_VERSION']}+{args['TORCH_CUDA']}")
    original = (ROOT / "constraints.txt").read_text().splitlines()
    out = subprocess.run(["sed", "-E", shlex.split(expr)[0], str(ROOT / "constraints.txt")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    pins = {ln.split("==")[0].lower(): ln.split("==", 1)[1] for ln in out if "==" in ln}
    assert cuda in SpecifierSet(f"=={pins['torch']}")
    assert cuda.public == args["TORCH_VERSION"]
    changed = [(a, b) for a, b in zip(original, out) if a != b]
    assert len(out) == len(original) and all(a.startswith("torch==") for a, _ in changed)


def test_dockerfile_runtime_is_non_root_and_secret_free():
    steps = _instructions()
    text = DOCKERFILE.read_text()
    user = [a for ins, a in steps if ins == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"} and _dockerfile_uid() >= 1000
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    assert any(ins == "USER" for ins, _ in steps[last_from:])  # in the final stage
    assert re.search(r"^ENV .*PYTHONUNBUFFERED=1", re.sub(r"\\\n", " ", text), re.M)
    assert any(ins == "WORKDIR" for ins, _ in steps[last_from:])
    for ins, a in steps:
        if ins in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", a, re.I), a
    ignore = {ln.strip() for ln in (ROOT / "infra" / "Dockerfile.dockerignore").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "infra/.env", "infra/client.env", "data", "processed", "models",
            "runs",
            "mlflow/*.db", "mlflow/artifacts"} <= ignore


# ---------------------------------------------------------------------------- README


def test_readme_lists_every_environment_variable():
    names = set(re.findall(r"^ENV\s+(.*)$", re.sub(r"\\\n", " ", DOCKERFILE.read_text()), re.M))
    env_names = {kv.split("=")[0] for line in names for kv in line.split()}
    for _, doc in _manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            env_names |= {e["name"] for e in c.get("env", [])}
    readme = README.read_text()
    assert env_names and not {n for n in env_names if f"`{n}`" not in readme}
    for needed in (r"kubectl (-n \S+ )?create secret generic brainlm-env --from-env-file=",
                   rf"prefect work-pool create {POOL} --type kubernetes --base-job-template "
                   r"infra/k8s/work-pool-gpu\.json",
                   r"docker build -f infra/Dockerfile ", r"helm install \S+ prefect/prefect-worker",
                   r"kubectl (-n \S+ )?apply -f infra/k8s/pretrain-torchrun\.yaml"):
        assert re.search(needed, readme), needed
