"""The data-parallel training job (deploy/k8s/training): a Kubeflow PyTorchJob checked offline.

There is no cluster and no operator here, so the job is checked in three layers:

1. the PyTorchJob against the kubeflow.org/v1 CRD's OpenAPI schema, vendored in
   schemas/kubeflow.org_v1_pytorchjob.json (scripts/vendor_crd_schema.py; unknown fields rejected);
2. each replica's pod template, and the job's other objects, against the Kubernetes API schemas
   with ``kubernetes-validate --strict`` (the CRD embeds PodTemplateSpec, which the subset leaves
   to this layer);
3. the rules the operator's admission webhook enforces (training-operator v1.9
   pkg/webhooks/pytorch/pytorchjob_webhook.go), which no schema states, and the house rules.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_support import K8S, require_tool, run

pytestmark = pytest.mark.unit

TRAINING = K8S / "training"
SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "kubeflow.org_v1_pytorchjob.json").read_text()
)
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # as test_deploy_k8s.py
REPLICA_TYPES = {"Master", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl")
    result = run([kubectl, "kustomize", str(TRAINING)])
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def job(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in rendered if d["kind"] == "PyTorchJob"]
    return found


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def webhook_errors(document: dict[str, Any]) -> list[str]:
    """The v1.9 webhook's rules (validatePyTorchJob, validateSpec, validatePyTorchReplicaSpecs)."""
    errors = []
    spec = document["spec"]
    if not DNS_1035.match(document["metadata"]["name"]):
        errors.append("metadata.name must be a DNS-1035 label")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        errors.append("spec.pytorchReplicaSpecs must be required")
    if "elasticPolicy" in spec and "Worker" not in replicas:
        errors.append("Worker must be configured if elastic policy is used")
    if "nProcPerNode" in spec.get("elasticPolicy", {}) and "nprocPerNode" in spec:
        errors.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    for kind, replica in replicas.items():
        if kind not in REPLICA_TYPES:
            errors.append(f"{kind}: replica type not supported")
        containers = replica.get("template", {}).get("spec", {}).get("containers", [])
        if not containers or any(not c.get("image") for c in containers):
            errors.append(f"{kind}: containers and their images must be specified")
        if "pytorch" not in {c.get("name") for c in containers}:
            errors.append(f"{kind}: must have at least one container with name pytorch")
        if kind == "Master" and replica.get("replicas") != 1:
            errors.append("Master.replicas must be 1")
        if kind == "Worker" and replica.get("replicas", 1) < 1:
            errors.append("Worker.replicas must be at least 1")
    return errors


def pod_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: r["template"] for k, r in job["spec"]["pytorchReplicaSpecs"].items()}


def pytorch_container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "pytorch"]
    return container


# -- 1. the CRD schema -----------------------------------------------------------------------


def test_the_job_passes_the_crd_schema(job: dict[str, Any]) -> None:
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert schema_errors(job) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "pytorchReplicaSpecs", "Worker", "replica"), 2),  # misspelt field
        (("spec", "runPolicy", "backoffLimits"), 3),
        (("spec", "pytorchReplicaSpecs", "Master", "replicas"), "one"),  # wrong type
        (("spec", "nprocPerNode"), 1),  # a string in the CRD ("auto", "gpu", "4")
        (("spec", "elasticPolicy", "rdzvPort"), "29400"),
    ],
)
def test_the_schema_rejects_what_the_api_server_would(
    job: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    """Control: the vendored schema really checks (a misspelt or mistyped field fails)."""
    bad = copy.deepcopy(job)
    node = bad
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    assert schema_errors(bad)
    del bad["spec"]["pytorchReplicaSpecs"]
    assert any("pytorchReplicaSpecs" in e for e in schema_errors(bad))


# -- 2. the pod templates and the other objects -----------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_pod_templates_and_objects_validate_strictly(
    rendered: list[dict[str, Any]], job: dict[str, Any], version: str, tmp_path: Path
) -> None:
    validator = require_tool("kubernetes-validate")
    documents = [d for d in rendered if d["kind"] != "PyTorchJob"]
    for kind, template in pod_templates(job).items():
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{job['metadata']['name']}-{kind.lower()}"},
                "template": template,
            }
        )
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    result = run([validator, "--strict", "--kubernetes-version", version, str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Couldn't find schema" not in output, output
    assert output.count(" passed for resource ") == len(documents), output


# -- 3. the operator's rules and the house rules ----------------------------------------------


def test_the_operator_would_admit_the_job(job: dict[str, Any]) -> None:
    assert webhook_errors(job) == []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] in RESTART_POLICIES
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in CLEAN_POD_POLICIES
    # controls: each rule fires
    for edit, rule in [
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief={}), "Chief"),
        (lambda j: j["metadata"].update(name="Base_Training"), "DNS-1035"),
        (
            lambda j: pod_templates(j)["Worker"]["spec"]["containers"][0].update(name="trainer"),
            "pytorch",
        ),
    ]:
        bad = copy.deepcopy(job)
        edit(bad)
        assert any(rule in e for e in webhook_errors(bad)), rule


def test_each_rank_runs_torchrun_on_the_training_cli(job: dict[str, Any]) -> None:
    """torchrun reads the operator's PET_* variables; the arguments are the CLI's own."""
    from riffloop.music.__main__ import _parser

    for template in pod_templates(job).values():
        container = pytorch_container(template)
        assert container["command"] == ["python", "-m", "torch.distributed.run"]
        args = container["args"]
        assert args[:2] == ["-m", "riffloop.music"]
        parsed = _parser().parse_args(args[2:])
        assert parsed.command == "train" and parsed.device == "cuda"
        assert parsed.out.startswith("/data/") and parsed.corpus.startswith("/data/")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"pytorchjob-port": 23456}
    gpus = {
        int(pytorch_container(t)["resources"]["limits"][GPU]) for t in pod_templates(job).values()
    }
    assert gpus == {int(job["spec"]["nprocPerNode"])}  # one rank per GPU


def test_pods_are_locked_down_like_the_services(job: dict[str, Any]) -> None:
    for template in pod_templates(job).values():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        security = pytorch_container(template)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in pytorch_container(template)["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/data"} <= mounts


def test_ranks_may_reach_each_other_through_the_default_deny(
    rendered: list[dict[str, Any]], job: dict[str, Any]
) -> None:
    """base/networkpolicies.yaml denies all traffic of part-of=riffloop pods; the job's ranks
    are such pods, and NCCL/gloo pick their ports at run time."""
    (policy,) = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in pod_templates(job).values():
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "riffloop"
        assert selector.items() <= labels.items()
    for rule, peers in (("ingress", "from"), ("egress", "to")):
        (allowed,) = policy["spec"][rule]
        assert "ports" not in allowed  # every port
        assert allowed[peers] == [{"podSelector": {"matchLabels": selector}}]


# -- the trainer's launcher (components/pytorchjob-launcher on the production overlay) ---------

LAUNCHER = K8S / "components" / "pytorchjob-launcher"


@pytest.fixture(scope="module")
def with_launcher(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The production overlay with the component, as a site's overlay would add it."""
    kubectl = require_tool("kubectl")
    root = tmp_path_factory.mktemp("overlay")
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "riffloop",
        "resources": [os.path.relpath(K8S / "overlays" / "production", root)],
        "components": [os.path.relpath(LAUNCHER, root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    result = run([kubectl, "kustomize", str(root)])
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    return found


def _trainer(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment", "riffloop-trainer")


def _template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    data = _one(docs, "ConfigMap", "riffloop-finetune-job")["data"]
    return dict(yaml.safe_load(data["finetune-job.yaml"]))


def _trainer_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    from test_deploy_k8s import container_env

    (container,) = _trainer(docs)["spec"]["template"]["spec"]["containers"]
    return {k: v for k, v in container_env(docs, container).items() if k.startswith("RIFFLOOP_")}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_overlay_with_the_launcher_validates_strictly(
    with_launcher: list[dict[str, Any]], version: str, tmp_path: Path
) -> None:
    validator = require_tool("kubernetes-validate")
    core = [d for d in with_launcher if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    template = _template(with_launcher)
    for kind, pod in pod_templates(template).items():
        core.append(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": kind.lower()}}
            | {"template": pod}
        )
    path = tmp_path / "launcher.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = run([validator, "--strict", "--kubernetes-version", version, str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Couldn't find schema" not in output, output
    assert output.count(" passed for resource ") == len(core), output


def test_the_jobs_the_launcher_creates_pass_the_crd_and_the_operator(
    with_launcher: list[dict[str, Any]], tmp_path: Path
) -> None:
    from riffloop.music.__main__ import _parser
    from riffloop.music._pytorchjob import KubernetesApi, PyTorchJobLauncher

    env = _trainer_env(with_launcher)
    launcher = PyTorchJobLauncher(
        KubernetesApi("https://kubernetes.invalid"),
        "riffloop",
        _template(with_launcher),
        Path(env["RIFFLOOP_TRAIN_JOB_DIR"]),
    )
    name = launcher.job_name("v0002")
    job = launcher.job(name, launcher.jobs_dir / name)
    assert schema_errors(job) == [] and webhook_errors(job) == []
    (trainer,) = _trainer(with_launcher)["spec"]["template"]["spec"]["containers"]
    for pod in pod_templates(job).values():
        container = pytorch_container(pod)
        assert container["image"] == trainer["image"]  # ConfigMap data: kept in step by hand
        args = container["args"]
        parsed = _parser().parse_args(args[args.index("riffloop.music") + 1 :])
        assert parsed.command == "finetune" and parsed.bundle == f"/jobs/{name}"
        # the bundle's volume: the trainer's claim, at the same path in both pods
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert mounts["jobs"] == env["RIFFLOOP_TRAIN_JOB_DIR"]
        assert claims["jobs"] == "riffloop-training-jobs"
    trainer_mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    assert trainer_mounts["jobs"] == env["RIFFLOOP_TRAIN_JOB_DIR"]


def test_the_trainer_may_do_what_the_launcher_does_and_no_more(
    with_launcher: list[dict[str, Any]],
) -> None:
    from riffloop.music._pytorchjob import SERVICE_ACCOUNT_DIR

    role = _one(with_launcher, "Role", "riffloop-trainer-pytorchjobs")
    assert role["rules"] == [
        {
            "apiGroups": ["kubeflow.org"],
            "resources": ["pytorchjobs"],
            "verbs": ["create", "get", "delete"],
        }
    ]
    binding = _one(with_launcher, "RoleBinding", "riffloop-trainer-pytorchjobs")
    pod = _trainer(with_launcher)["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "riffloop"}
    ]
    # a short-lived projected token where the launcher reads it; no automounted one
    assert pod["automountServiceAccountToken"] is False
    (trainer,) = pod["containers"]
    mounts = {m["name"]: m for m in trainer["volumeMounts"]}
    assert mounts["kube-api-access"]["mountPath"] == str(SERVICE_ACCOUNT_DIR)
    assert mounts["kube-api-access"]["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    paths = set()
    for source in volume["projected"]["sources"]:
        if "serviceAccountToken" in source:
            paths.add(source["serviceAccountToken"]["path"])
            assert source["serviceAccountToken"]["expirationSeconds"] <= 3600
        for key in ("configMap", "downwardAPI"):
            paths |= {item["path"] for item in source.get(key, {}).get("items", [])}
    assert paths == {"token", "ca.crt", "namespace"}
    template_file = Path(_trainer_env(with_launcher)["RIFFLOOP_TRAIN_JOB_TEMPLATE"])
    assert mounts["finetune-job"]["mountPath"] == str(template_file.parent)


def test_the_trainer_settings_accept_the_launcher_and_refuse_a_wrong_one(
    with_launcher: list[dict[str, Any]], tmp_path: Path
) -> None:
    from test_deploy_k8s import parseable_env

    from riffloop.core import ConfigurationError
    from services.trainer import TrainerSettings

    env = parseable_env(_trainer(with_launcher), _trainer_env(with_launcher), tmp_path)
    settings = TrainerSettings.from_env(env)
    assert settings.train_launcher == "pytorchjob"
    assert TrainerSettings.from_env({}).train_launcher == "in_process"  # the default
    with pytest.raises(ConfigurationError, match="in_process or pytorchjob"):
        TrainerSettings.from_env({**env, "RIFFLOOP_TRAIN_LAUNCHER": "kubectl"})
    without = {k: v for k, v in env.items() if k != "RIFFLOOP_TRAIN_JOB_TEMPLATE"}
    with pytest.raises(ConfigurationError, match="RIFFLOOP_TRAIN_JOB_TEMPLATE"):
        TrainerSettings.from_env(without)
    with pytest.raises(ConfigurationError, match=r"PREFERENCE_BETA .*in_process"):
        TrainerSettings.from_env({**env, "RIFFLOOP_PREFERENCE_BETA": "500"})
    assert TrainerSettings.from_env({"RIFFLOOP_PREFERENCE_BETA": "500"}).preference_beta == 500
    with pytest.raises(ConfigurationError, match="PREFERENCE_BETA"):
        TrainerSettings.from_env({"RIFFLOOP_PREFERENCE_BETA": "-1"})
    assert TrainerSettings.from_env({"RIFFLOOP_TRAIN_WINDOWS": "all"}).train_windows == "all"
    with pytest.raises(ConfigurationError, match="RIFFLOOP_TRAIN_WINDOWS must be first or all"):
        TrainerSettings.from_env({"RIFFLOOP_TRAIN_WINDOWS": "most"})
    both = {"RIFFLOOP_TRAIN_WINDOWS": "all", "RIFFLOOP_PREFERENCE_BETA": "500"}
    with pytest.raises(ConfigurationError, match="RIFFLOOP_TRAIN_WINDOWS must be first when"):
        TrainerSettings.from_env(both)
