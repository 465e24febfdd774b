"""The kustomize overlays render, validate strictly against the Kubernetes API schemas, and follow
the house rules the schemas cannot know (probes, resources, PDBs, selectors, ports, GPU placement,
security context, NetworkPolicies that allow only the flows of design.md §1, settings every service
accepts).

Core resources go through ``kubernetes-validate --strict`` for each pinned Kubernetes version. The
Prometheus Operator objects (ServiceMonitor, PrometheusRule) are CRDs that kubernetes-validate does
not know (it only warns), so they are checked against the schemas in ``CRD_SCHEMAS`` below, written
for the fields of monitoring.coreos.com/v1 we use, with unknown fields rejected.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from deploy_support import (
    OVERLAYS,
    REPO,
    SERVICES,
    by_name,
    of_kind,
    render,
    require_tool,
    run,
    selector_matches,
)

pytestmark = pytest.mark.unit

# The oldest Kubernetes minor the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACES = {"dev": "riffloop-dev", "production": "riffloop"}
GRPC_PORT, METRICS_PORT, WEB_PORT = 50051, 9100, 8080
CRD_GROUP = "monitoring.coreos.com/"
# Secrets the production overlay references but the platform creates (docs/DEPLOY.md lists them):
# one S3 key pair and one Kafka SCRAM user per service, and the shared ones.
EXTERNAL_SECRETS = {
    "riffloop-redis",
    "riffloop-gateway-auth",
    "riffloop-dispatch-key",
    "riffloop-operator",
    *(f"riffloop-s3-{s}" for s in SERVICES),
    *(f"riffloop-kafka-{s}" for s in SERVICES),
}
# ConfigMaps likewise: the CA that signed the Kafka brokers' certificates.
EXTERNAL_CONFIGMAPS = {"riffloop-kafka-ca"}
HPA_SERVICES = {"gateway", "generator"}
SINGLE_WRITERS = {"feedback", "selector", "trainer"}
GPU = "nvidia.com/gpu"


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by service name (label app.kubernetes.io/name)."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/name"]: d for d in of_kind(docs, "Deployment")
    }


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def all_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container starts with, as far as the rendered objects tell.

    Values from Secrets that the platform creates (not rendered) are stand-ins of the right shape.
    """
    configmaps, secrets = by_name(docs, "ConfigMap"), by_name(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            if name in secrets:
                env.update(decoded(secrets[name]))
            else:
                assert source["secretRef"].get("optional"), f"envFrom Secret {name} not optional"
    stand_ins = {"RIFFLOOP_REDIS_URL": "rediss://:stand-in@redis.internal:6380/0"}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if name in secrets:
                env[item["name"]] = decoded(secrets[name])[key]
            else:
                env[item["name"]] = stand_ins.get(item["name"], "stand-in-secret-0123456789abcdef")
        elif "configMapKeyRef" in ref:
            name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            env[item["name"]] = configmaps[name]["data"][key]
    return env


# -- rendering and schema validation ---------------------------------------------------------


@pytest.mark.parametrize("overlay_name", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_resources_validate_strictly(overlay_name: str, version: str, tmp_path: Path) -> None:
    validator = require_tool("kubernetes-validate")
    core = [d for d in render(overlay_name) if not d["apiVersion"].startswith(CRD_GROUP)]
    path = tmp_path / f"{overlay_name}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = run([validator, "--strict", "--kubernetes-version", version, str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # kubernetes-validate only warns about kinds it has no schema for; no core kind may be one.
    assert "Couldn't find schema" not in output, output
    assert output.count(" passed for resource ") == len(core), output


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """Control: the validator really is strict (a misspelt field fails, not passes silently)."""
    validator = require_tool("kubernetes-validate")
    deployment = copy.deepcopy(of_kind(render("dev"), "Deployment")[0])
    pod_spec(deployment)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run([validator, "--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0], str(path)])
    assert result.returncode != 0, result.stdout + result.stderr


# Own schemas for the monitoring.coreos.com/v1 objects we ship (fields of the operator's CRDs);
# additionalProperties: false everywhere, so a misspelt field fails like --strict would.
_DURATION = {
    "type": "string",
    "pattern": (
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
        r"(([0-9]+)ms)?)$"
    ),
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer", "minimum": 0},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "targetPort": {"type": ["string", "integer"]},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "limit": {"type": "integer"},
                                "query_offset": _DURATION,
                                "labels": _STRING_MAP,
                                "rules": {"type": "array", "items": _RULE},
                            },
                        },
                    }
                },
            },
        },
    },
}


def crd_errors(document: dict[str, Any]) -> list[str]:
    schema = CRD_SCHEMAS.get(document["kind"])
    if schema is None:
        return [f"no schema for {document['apiVersion']} {document['kind']}"]
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_monitoring_objects_pass_their_schemas() -> None:
    crds = [d for d in render("production") if d["apiVersion"].startswith(CRD_GROUP)]
    assert {d["kind"] for d in crds} == {"ServiceMonitor", "PrometheusRule"}
    for document in crds:
        assert crd_errors(document) == [], document["metadata"]["name"]
    names = [g["name"] for d in of_kind(crds, "PrometheusRule") for g in d["spec"]["groups"]]
    assert len(names) == len(set(names)), "rule group names must be unique"


def test_crd_schema_rejects_a_misspelt_field() -> None:
    monitor = copy.deepcopy(of_kind(render("production"), "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    assert crd_errors(monitor), "a misspelt ServiceMonitor field must fail"
    rule = copy.deepcopy(of_kind(render("production"), "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert crd_errors(rule), "a malformed duration must fail"


def test_dev_has_no_prometheus_operator_objects() -> None:
    """dev runs on clusters without the operator: its CRD objects would fail `kubectl apply`."""
    assert not [d for d in render("dev") if d["apiVersion"].startswith(CRD_GROUP)]


# -- house rules ------------------------------------------------------------------------------


def test_every_service_is_deployed(docs: list[dict[str, Any]]) -> None:
    assert set(deployments(docs)) == set(SERVICES)
    for kind in ("Service", "ServiceAccount", "PodDisruptionBudget"):
        names = set(by_name(docs, kind))
        assert {f"riffloop-{s}" for s in SERVICES} <= names, kind


def test_namespace_enforces_restricted_pod_security(
    overlay: str, docs: list[dict[str, Any]]
) -> None:
    (namespace,) = of_kind(docs, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACES[overlay]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for document in docs:
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == NAMESPACES[overlay], document["kind"]


def test_selectors_match_pod_labels(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(deployment["spec"]["selector"], labels), name
        assert pod_spec(deployment)["serviceAccountName"] in by_name(docs, "ServiceAccount")
        # No other Deployment's pods fall under this selector (a Service would mix them).
        others = [d for n, d in deployments(docs).items() if n != name]
        for other in others:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector_matches(deployment["spec"]["selector"], other_labels), (name, other)


def test_three_grpc_probes_on_the_configured_port(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        (container,) = pod_spec(deployment)["containers"]
        env = container_env(docs, container)
        # Explicit, not defaults: each service has its own default ports for local stacks.
        assert env.get("RIFFLOOP_GRPC_PORT") == str(GRPC_PORT), name
        assert env.get("RIFFLOOP_METRICS_PORT") == str(METRICS_PORT), name
        assert env.get("RIFFLOOP_BIND_HOST") == "0.0.0.0", f"{name} would listen on loopback only"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        web = {"web": WEB_PORT} if name == "gateway" else {}  # its browser API (Connect)
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT, **web}, name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in container, f"{name} has no {probe}"
            assert container[probe]["grpc"]["port"] == GRPC_PORT, (name, probe)
        # Liveness must not depend on Kafka/S3/Redis (a broker outage must not restart every pod):
        # it asks for the "liveness" health entry; readiness asks for the overall ("") status.
        assert container["livenessProbe"]["grpc"].get("service") == "liveness", name
        assert container["startupProbe"]["grpc"].get("service") == "liveness", name
        assert container["readinessProbe"]["grpc"].get("service", "") == "", name


_CPU = re.compile(r"^(\d+(\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti)?$")


def _cpu(value: str | int) -> float:
    match = _CPU.match(str(value))
    assert match, value
    return float(match.group(1)) / (1000 if match.group(3) else 1)


def _memory(value: str | int) -> int:
    match = _MEMORY.match(str(value))
    assert match, value
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return int(match.group(1)) * scale


def test_resources_have_requests_and_limits(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        for container in all_containers(deployment):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for key in ("cpu", "memory"):
                assert key in requests and key in limits, f"{name}: {key} requests and limits"
            assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"]), name
            assert _memory(requests["memory"]) <= _memory(limits["memory"]), name


def test_gpu_only_in_the_trainers_limits_in_production(
    overlay: str, docs: list[dict[str, Any]]
) -> None:
    for name, deployment in deployments(docs).items():
        for container in all_containers(deployment):
            resources = container.get("resources", {})
            assert GPU not in resources.get("requests", {}), f"{name}: {GPU} belongs in limits only"
            has_gpu = GPU in resources.get("limits", {})
            expected = overlay == "production" and name == "trainer"
            assert has_gpu == expected, (
                f"{name} in {overlay}: GPU {'missing' if expected else 'not allowed'}"
            )
            if expected:
                assert int(resources["limits"][GPU]) == 1
        spec = pod_spec(deployment)
        on_gpu_node = overlay == "production" and name == "trainer"
        tolerates = any(t.get("key") == GPU for t in spec.get("tolerations", []))
        assert tolerates == on_gpu_node, f"{name}: GPU toleration"
        assert bool(spec.get("nodeSelector")) == on_gpu_node, f"{name}: nodeSelector"


def test_pods_are_non_root_with_read_only_root(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        spec = pod_spec(deployment)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] != 0 and pod_security["runAsGroup"] != 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        # Service links would inject RIFFLOOP_GATEWAY_SERVICE_HOST & co. (from the Service names
        # riffloop-*): unknown RIFFLOOP_* settings, which stop every process with exit code 2.
        assert spec.get("enableServiceLinks") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in all_containers(deployment):
            security = container["securityContext"]
            assert security.get("runAsNonRoot", pod_security["runAsNonRoot"]) is True, name
            assert security.get("runAsUser", pod_security["runAsUser"]) != 0, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert not security["capabilities"].get("add"), name
            assert not security.get("privileged"), name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: /tmp must be writable (emptyDir)"
            assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_every_deployment_has_a_matching_pdb(docs: list[dict[str, Any]]) -> None:
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for name, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if selector_matches(p["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{name}: {len(matching)} PDBs select its pods"
        spec = matching[0]["spec"]
        # maxUnavailable keeps node drains possible even at one replica.
        assert "maxUnavailable" in spec and "minAvailable" not in spec, name


def test_services_target_existing_ports(docs: list[dict[str, Any]]) -> None:
    pods = deployments(docs)
    for service in of_kind(docs, "Service"):
        targets = [
            d
            for d in pods.values()
            if selector_matches(
                {"matchLabels": service["spec"]["selector"]},
                d["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        (container,) = pod_spec(targets[0])["containers"]
        names = {p["name"] for p in container["ports"]}
        numbers = {p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert (target in names) if isinstance(target, str) else (target in numbers), port


def test_autoscalers(overlay: str, docs: list[dict[str, Any]]) -> None:
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in hpas}
    assert targets == {f"riffloop-{s}" for s in HPA_SERVICES}
    for name, deployment in deployments(docs).items():
        # An HPA-scaled Deployment sets no replicas, or every `kubectl apply` would reset them.
        assert ("replicas" in deployment["spec"]) == (name not in HPA_SERVICES), name
    for hpa in hpas:
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        if overlay == "production":
            assert hpa["spec"]["minReplicas"] >= 2, "production keeps two replicas at least"
        assert by_name(docs, "Deployment")[hpa["spec"]["scaleTargetRef"]["name"]]


def test_single_writers_run_alone(docs: list[dict[str, Any]]) -> None:
    """feedback, selector and trainer keep their state in one process (feedback's ledger and
    spam filter see every rating of a rater): one replica, no autoscaler, and Recreate, so a
    rollout never runs two in one consumer group."""
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
    pods = deployments(docs)
    for name in SINGLE_WRITERS:
        deployment = pods[name]
        assert deployment["spec"]["replicas"] == 1, name
        assert deployment["spec"]["strategy"]["type"] == "Recreate", name
        assert deployment["metadata"]["name"] not in scaled, name


def test_consumers_do_not_outnumber_the_partitions(docs: list[dict[str, Any]]) -> None:
    """Replicas of a consumer group beyond the topic's partition count would sit idle."""
    hpa_max = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["maxReplicas"]
        for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    for name, deployment in deployments(docs).items():
        if name == "gateway":
            continue  # serves gRPC; its consumers are a side job
        (container,) = pod_spec(deployment)["containers"]
        partitions = int(container_env(docs, container).get("RIFFLOOP_KAFKA_PARTITIONS", "3"))
        most = hpa_max.get(deployment["metadata"]["name"], deployment["spec"].get("replicas", 1))
        assert most <= partitions, f"{name}: up to {most} replicas, {partitions} partitions"


def test_production_has_more_replicas_than_dev() -> None:
    def capacity(overlay: str) -> dict[str, int]:
        docs = render(overlay)
        hpa_min = {
            h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
            for h in of_kind(docs, "HorizontalPodAutoscaler")
        }
        return {
            n: d["spec"].get("replicas", hpa_min.get(n, 1))
            for n, d in by_name(docs, "Deployment").items()
        }

    dev, production = capacity("dev"), capacity("production")
    assert all(production[n] >= dev[n] for n in dev)
    assert sum(production.values()) > sum(dev.values())


def test_images_are_tagged(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        for container in all_containers(deployment):
            image = container["image"]
            assert image.startswith(f"riffloop/{name}") or f"/riffloop/{name}" in image, image
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert (tag and tag != "latest") or "@sha256:" in image, f"{name}: untagged {image}"


def test_referenced_configmaps_and_secrets_exist(overlay: str, docs: list[dict[str, Any]]) -> None:
    configmaps, secrets = set(by_name(docs, "ConfigMap")), set(by_name(docs, "Secret"))
    missing_secrets: set[str] = set()
    missing_configmaps: set[str] = set()
    for deployment in deployments(docs).values():
        for volume in pod_spec(deployment).get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
                missing_configmaps.add(volume["configMap"]["name"])
            if "secret" in volume and volume["secret"]["secretName"] not in secrets:
                missing_secrets.add(volume["secret"]["secretName"])
        for container in all_containers(deployment):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                elif source["secretRef"]["name"] not in secrets:
                    missing_secrets.add(source["secretRef"]["name"])
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["name"] in configmaps
                if "secretKeyRef" in ref and ref["secretKeyRef"]["name"] not in secrets:
                    missing_secrets.add(ref["secretKeyRef"]["name"])
    if overlay == "dev":
        assert missing_secrets == set(), "dev must run without hand-made Secrets"
        assert missing_configmaps == set(), "dev must run without hand-made ConfigMaps"
    else:
        assert missing_secrets == EXTERNAL_SECRETS, "production Secrets are created by the platform"
        assert missing_configmaps == EXTERNAL_CONFIGMAPS
        deploy_doc = (REPO / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
        for secret in missing_secrets | missing_configmaps:
            assert f"`{secret}`" in deploy_doc, f"docs/DEPLOY.md must say how to create {secret}"
    # No credentials in ConfigMaps.
    for configmap in of_kind(docs, "ConfigMap"):
        for key, value in (configmap.get("data") or {}).items():
            assert not re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", key), key
            if key.endswith("_URL"):
                assert urlsplit(value).password is None, f"{key} carries a password"


def test_drain_fits_in_the_termination_grace_period(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        (container,) = pod_spec(deployment)["containers"]
        env = container_env(docs, container)
        drain = float(env.get("RIFFLOOP_DRAIN_GRACE_S", "10"))
        delay = float(env.get("RIFFLOOP_DRAIN_DELAY_S", "0"))
        grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        # the delay while endpoints drop the pod, then the gRPC drain and the workers, each up
        # to `drain`, before the kubelet's SIGKILL
        assert delay >= 1, f"{name}: no delay between NOT_SERVING and refusing calls"
        assert delay + 2 * drain <= grace, f"{name}: {delay}s + 2 x {drain}s > {grace}s"


def test_torch_threads_match_the_cpu_limit(docs: list[dict[str, Any]]) -> None:
    """torch services run as many intra-op threads as the CPU limit allows, no more, no fewer."""
    for name in ("encoder", "generator", "trainer"):
        (container,) = pod_spec(deployments(docs)[name])["containers"]
        threads = container_env(docs, container).get("RIFFLOOP_TORCH_THREADS")
        assert threads is not None, f"{name}: set RIFFLOOP_TORCH_THREADS (the default is 1)"
        assert int(threads) == _cpu(container["resources"]["limits"]["cpu"]), name


def _settings_class(service: str) -> Any:
    try:
        module = importlib.import_module(f"services.{service}")
    except ModuleNotFoundError as error:
        if error.name in (f"services.{service}", "services"):
            pytest.skip(
                f"services/{service} is not in the tree yet; its settings cannot be checked"
            )
        raise
    from riffloop.core import Settings

    classes = {
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Settings) and obj is not Settings
    }
    assert len(classes) == 1, f"services.{service} should export one Settings class: {classes}"
    return classes.pop()


def _mounted_file(deployment: dict[str, Any], path: str) -> tuple[str, str]:
    """(ConfigMap or Secret name, key) of the volume file the container sees at ``path``."""
    (container,) = pod_spec(deployment)["containers"]
    volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = volumes[mount["name"]]
            source = volume.get("configMap") or volume["secret"]
            relative = path.removeprefix(prefix)
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            return source.get("name") or source["secretName"], items.get(relative, relative)
    raise AssertionError(f"nothing is mounted at {path}")


def parseable_env(deployment: dict[str, Any], env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` with the files start-up reads (the Kafka CA bundle) replaced by stand-ins in
    ``folder``, after checking each is mounted from the ConfigMap that holds it."""
    out = dict(env)
    if "RIFFLOOP_KAFKA_SSL_CAFILE" in out:  # start-up checks the file: it must be mounted
        assert _mounted_file(deployment, out["RIFFLOOP_KAFKA_SSL_CAFILE"]) == (
            "riffloop-kafka-ca",
            "ca.crt",
        )
        stand_in = folder / "ca.crt"
        stand_in.write_text("-----BEGIN CERTIFICATE-----\n")
        out["RIFFLOOP_KAFKA_SSL_CAFILE"] = str(stand_in)
    return out


@pytest.mark.parametrize("overlay_name", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_accepts_its_settings(overlay_name: str, service: str, tmp_path: Path) -> None:
    """The environment of each pod parses (an unknown RIFFLOOP_* name or bad value exits 2)."""
    settings_class = _settings_class(service)
    docs = render(overlay_name)
    deployment = deployments(docs)[service]
    (container,) = pod_spec(deployment)["containers"]
    env = {k: v for k, v in container_env(docs, container).items() if k.startswith("RIFFLOOP_")}
    settings = settings_class.from_env(parseable_env(deployment, env, tmp_path))
    assert settings.backend == "real"
    assert settings.grpc_port == GRPC_PORT and settings.metrics_port == METRICS_PORT
    assert getattr(settings, "service_name", service) == service
    fields = {f.name for f in dataclasses.fields(settings)}
    assert "bind_host" in fields and settings.bind_host == "0.0.0.0"


# -- NetworkPolicies: only the flows of design.md §1 ------------------------------------------

# (protocol, port, endPort) that each overlay's pods may reach besides DNS.
BACKEND_EGRESS: dict[str, set[tuple[str, int, int | None]]] = {
    "dev": {("TCP", 9092, None), ("TCP", 9000, None), ("TCP", 6379, None)},
    "production": {("TCP", 9093, None), ("TCP", 443, None), ("TCP", 6380, None)},
}
DNS: set[tuple[str, int, int | None]] = {("UDP", 53, None), ("TCP", 53, None)}


def _policies_for(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], labels) or p["spec"]["podSelector"] == {}
    ]


def _ports(rule: dict[str, Any]) -> set[tuple[str, int, int | None]]:
    assert rule.get("ports"), f"a rule without ports opens every port: {rule}"
    return {(p.get("protocol", "TCP"), p["port"], p.get("endPort")) for p in rule["ports"]}


def test_the_web_page_is_routed_to_the_gateways_web_port(docs: list[dict[str, Any]]) -> None:
    """Ingress riffloop-web -> Service riffloop-gateway-web -> the container port the gateway's
    Connect server listens on (RIFFLOOP_CONNECT_PORT in its settings)."""
    (ingress,) = of_kind(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    web = services[backend["name"]]
    (port,) = [p for p in web["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    (container,) = pod_spec(deployments(docs)["gateway"])["containers"]
    (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    settings = {
        k: v
        for c in of_kind(docs, "ConfigMap")
        if c["metadata"]["name"].startswith("riffloop-gateway-settings")
        for k, v in c["data"].items()
    }
    assert target["containerPort"] == WEB_PORT == int(settings["RIFFLOOP_CONNECT_PORT"])


def test_default_deny_covers_every_pod(docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        deny = [
            p
            for p in _policies_for(docs, labels)
            if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert deny, f"{name} is not under a default-deny policy"


def test_ingress_only_clients_to_gateway_and_prometheus_to_metrics(
    docs: list[dict[str, Any]],
) -> None:
    for name, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        allowed: dict[tuple[str, int, int | None], list[Any]] = {}
        for policy in _policies_for(docs, labels):
            for rule in policy["spec"].get("ingress", []):
                for port in _ports(rule):
                    allowed.setdefault(port, []).append(rule.get("from"))
        expected = {("TCP", METRICS_PORT, None)} | (
            {("TCP", GRPC_PORT, None), ("TCP", WEB_PORT, None)} if name == "gateway" else set()
        )
        assert set(allowed) == expected, f"{name} accepts {sorted(allowed)}"
        for source in allowed[("TCP", METRICS_PORT, None)]:
            assert source, "the metrics port is open to Prometheus only, not to everyone"
            for peer in source:
                ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                assert ns == "monitoring"
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus"


def test_egress_only_dns_and_backends(overlay: str, docs: list[dict[str, Any]]) -> None:
    for name, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        allowed: set[tuple[str, int, int | None]] = set()
        for policy in _policies_for(docs, labels):
            for rule in policy["spec"].get("egress", []):
                assert rule.get("to"), f"{policy['metadata']['name']}: egress to anywhere"
                ports = _ports(rule)
                if ports & DNS:
                    peers = rule["to"]
                    assert all(
                        p["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"} for p in peers
                    )
                allowed |= ports
        assert allowed == DNS | BACKEND_EGRESS[overlay], f"{name} may reach {sorted(allowed)}"


def _reachable(port: int, allowed: set[tuple[str, int, int | None]]) -> bool:
    return any(proto == "TCP" and lo <= port <= (hi or lo) for proto, lo, hi in allowed)


def test_backend_addresses_are_reachable_through_the_policies(
    overlay: str, docs: list[dict[str, Any]]
) -> None:
    """The Kafka, S3 and Redis ports in the settings are ports the egress policies allow."""
    allowed = BACKEND_EGRESS[overlay]
    deployment = deployments(docs)["gateway"]
    (container,) = pod_spec(deployment)["containers"]
    env = container_env(docs, container)
    for server in env["RIFFLOOP_KAFKA_BOOTSTRAP"].split(","):
        assert _reachable(int(server.rsplit(":", 1)[1]), allowed), server
    s3 = urlsplit(env["RIFFLOOP_S3_ENDPOINT"])
    assert _reachable(s3.port or (443 if s3.scheme == "https" else 80), allowed), s3
    redis = urlsplit(env["RIFFLOOP_REDIS_URL"])
    assert _reachable(redis.port or 6379, allowed), redis


def test_service_monitors_select_existing_metrics_ports() -> None:
    docs = render("production")
    services = of_kind(docs, "Service")
    monitors = of_kind(docs, "ServiceMonitor")
    assert len(monitors) == len(SERVICES)
    for monitor in monitors:
        selected = [
            s
            for s in services
            if selector_matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        assert len(selected) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["port"] == "metrics"
            # Keep the services' own `service` label (alerts group by it).
            assert endpoint["honorLabels"] is True


def _redis_conf(text: str) -> dict[str, str]:
    """A redis.conf's directives (name → value), comments and blank lines left out."""
    pairs = [line.split(None, 1) for line in text.splitlines()]
    return {p[0]: p[1].strip() for p in pairs if p and not p[0].startswith("#")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_state_what_redis_needs(overlay: str) -> None:
    """Each overlay ships riffloop-redis-config (a stable name): the append-only file fsynced
    every second and no eviction — what the local stack runs its Redis with (riffloop.infra)."""
    from riffloop.infra import REDIS_REQUIREMENTS

    config = by_name(render(overlay), "ConfigMap")["riffloop-redis-config"]
    assert config["metadata"]["namespace"] == NAMESPACES[overlay]
    directives = _redis_conf(config["data"]["redis.conf"])
    assert directives == REDIS_REQUIREMENTS
    assert directives == {
        "appendonly": "yes",
        "appendfsync": "everysec",
        "maxmemory-policy": "noeviction",
    }


def test_redis_conf_parser_sees_a_missing_setting() -> None:
    assert _redis_conf("# persistence\nappendonly no\n\nmaxmemory-policy allkeys-lru\n") == {
        "appendonly": "no",
        "maxmemory-policy": "allkeys-lru",
    }
