"""Least privilege in the production overlay: each service its own Kafka SCRAM user and S3 key
pair, allowed only what its code does, and egress only to the backends' own address ranges.

The rights are derived from the code, not copied: the topics a service consumes are the keys of
its ``EventRouter`` (services/<name>/_build.py), the topics it publishes the literal topics of
its ``publish(`` calls, its buckets the ``buckets=`` of its ``ports.prepare`` call. A service that
starts reading or writing something new fails here until access/ says it may.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import re
from typing import Any

import pytest
import yaml
from deploy_support import K8S, REPO, SERVICES, by_name, of_kind, render

pytestmark = pytest.mark.unit

ACCESS = K8S / "overlays" / "production" / "access"
_TOPIC = r"[a-z]+\.[a-z]+\.v1(?:\.dlq)?"
# Who may write each bucket (design.md §2: uploads by the gateway, latents by the encoder, tracks
# by the generators, manifests by the selector, checkpoints and pointers by the trainer).
BUCKET_WRITERS = {
    "songs": {"gateway"},
    "latents": {"encoder"},
    "tracks": {"generator"},
    "trainsets": {"selector"},
    "models": {"trainer"},
}


def _sources(service: str) -> str:
    folder = REPO / "services" / service
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py")))


def consumed_topics(service: str) -> set[str]:
    """The topics of the EventRouter(s) in services/<service>/_build.py."""
    tree = ast.parse((REPO / "services" / service / "_build.py").read_text(encoding="utf-8"))
    topics: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "EventRouter":
            for argument in node.args:
                if isinstance(argument, ast.Dict):
                    topics |= {k.value for k in argument.keys if isinstance(k, ast.Constant)}
    return topics


def published_topics(service: str) -> set[str]:
    return set(re.findall(rf'publish\(\s*"({_TOPIC})"', _sources(service)))


def prepared_buckets(service: str) -> set[str]:
    """The ``buckets=`` tuple of the service's ``ports.prepare`` call."""
    tree = ast.parse((REPO / "services" / service / "_build.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "prepare":
            for keyword in node.keywords:
                if keyword.arg == "buckets":
                    return set(ast.literal_eval(keyword.value))
    raise AssertionError(f"services/{service}/_build.py does not name the buckets it prepares")


def kafka_users() -> dict[str, dict[str, Any]]:
    users = [d for d in yaml.safe_load_all((ACCESS / "kafka-users.yaml").read_text()) if d]
    return {u["metadata"]["name"]: u for u in users}


def _acls(user: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """operation → {(resource type, name)}."""
    out: dict[str, set[tuple[str, str]]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        resource = acl["resource"]
        assert resource["patternType"] == "literal", acl
        assert "*" not in resource["name"], f"wildcard resource {acl}"
        for operation in acl["operations"]:
            out.setdefault(operation, set()).add((resource["type"], resource["name"]))
    return out


def test_the_code_derivation_sees_every_service_read_and_write() -> None:
    """Control: the parsers find something for every service (an empty set would make the ACL
    checks below vacuous)."""
    from riffloop.core import all_topics

    catalogue = set(all_topics(with_dlq=True))
    for service in SERVICES:
        assert consumed_topics(service), service
        assert published_topics(service), service
        assert consumed_topics(service) | published_topics(service) <= catalogue, service
    assert "generation.requested.v1.dlq" in consumed_topics("gateway")
    assert published_topics("trainer") == {"model.published.v1", "trainset.published.v1"}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_a_kafka_user_allowed_only_what_its_code_does(service: str) -> None:
    from riffloop.core import all_topics

    user = kafka_users()[f"riffloop-{service}"]
    assert user["kind"] == "KafkaUser" and user["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    acls = _acls(user)
    consumed = consumed_topics(service)
    dead_letters = {f"{t}.dlq" for t in consumed if not t.endswith(".dlq")}
    assert set(acls) == {"Read", "Write", "Describe"}, sorted(acls)
    assert acls["Read"] == {("group", service)} | {("topic", t) for t in consumed}
    assert acls["Write"] == {("topic", t) for t in published_topics(service) | dead_letters}
    assert acls["Describe"] == {("topic", t) for t in all_topics(with_dlq=True)}


def test_there_is_one_kafka_user_per_service_and_no_other() -> None:
    assert set(kafka_users()) == {f"riffloop-{s}" for s in SERVICES}


def _policy(service: str) -> dict[str, Any]:
    return dict(json.loads((ACCESS / "s3" / f"{service}.json").read_text()))


def _object_actions(policy: dict[str, Any]) -> dict[str, set[str]]:
    """bucket → actions on its objects."""
    out: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        for resource in statement["Resource"]:
            if resource.endswith("/*"):
                bucket = resource.removeprefix("arn:aws:s3:::").removesuffix("/*")
                out.setdefault(bucket, set()).update(statement["Action"])
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_each_s3_policy_opens_only_the_buckets_the_service_prepares(service: str) -> None:
    from riffloop.runtime._ports import BUCKETS

    policy = _policy(service)
    assert policy["Version"] == "2012-10-17"
    buckets = prepared_buckets(service)
    assert buckets <= set(BUCKETS)
    listed: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "Principal" not in statement, statement
        actions = set(statement["Action"])
        assert not any(a == "*" or a.endswith(":*") for a in actions), statement
        if statement["Resource"] == ["*"]:  # only the readiness check's ListBuckets
            assert actions == {"s3:ListAllMyBuckets"}, statement
        elif actions == {"s3:ListBucket"}:
            listed |= {r.removeprefix("arn:aws:s3:::") for r in statement["Resource"]}
        else:
            assert all(r.endswith("/*") for r in statement["Resource"]), statement
            assert actions <= {
                "s3:GetObject",
                "s3:PutObject",
                "s3:AbortMultipartUpload",
                "s3:DeleteObject",
            }, statement
    objects = _object_actions(policy)
    assert listed == buckets == set(objects), (listed, buckets, set(objects))


def test_only_the_owner_of_a_bucket_writes_or_deletes_in_it() -> None:
    for bucket, writers in BUCKET_WRITERS.items():
        can_write = {
            s for s in SERVICES if "s3:PutObject" in _object_actions(_policy(s)).get(bucket, set())
        }
        assert can_write == writers, bucket
    for service in SERVICES:
        for bucket, actions in _object_actions(_policy(service)).items():
            if "s3:DeleteObject" in actions:  # models/CANARY is removed after a verdict
                assert (service, bucket) == ("trainer", "models")


def test_production_pods_use_their_own_identities() -> None:
    docs = render("production")
    seen: dict[str, str] = {}
    for deployment in of_kind(docs, "Deployment"):
        service = deployment["metadata"]["labels"]["app.kubernetes.io/name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        refs = {
            item["name"]: item["valueFrom"]["secretKeyRef"]
            for item in container["env"]
            if "secretKeyRef" in item.get("valueFrom", {})
        }
        expected = {
            "RIFFLOOP_S3_ACCESS_KEY": (f"riffloop-s3-{service}", "access-key"),
            "RIFFLOOP_S3_SECRET_KEY": (f"riffloop-s3-{service}", "secret-key"),
            "RIFFLOOP_KAFKA_SASL_USERNAME": (f"riffloop-kafka-{service}", "username"),
            "RIFFLOOP_KAFKA_SASL_PASSWORD": (f"riffloop-kafka-{service}", "password"),
        }
        for name, (secret, key) in expected.items():
            assert (refs[name]["name"], refs[name]["key"]) == (secret, key), (service, name)
            assert seen.setdefault(secret + key, service) == service, f"{secret} shared"
        internal = service != "gateway"
        assert ("RIFFLOOP_OPERATOR_SECRET" in refs) == internal, service
        if internal:
            assert refs["RIFFLOOP_OPERATOR_SECRET"]["name"] == "riffloop-operator"
    backends = by_name(docs, "ConfigMap")
    settings = next(c for n, c in backends.items() if n.startswith("riffloop-backends"))["data"]
    assert settings["RIFFLOOP_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert settings["RIFFLOOP_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"


def test_production_egress_goes_only_to_narrow_backend_ranges() -> None:
    docs = render("production")
    for policy in of_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            blocks = [peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer]
            for block in blocks:
                network = ipaddress.ip_network(block["cidr"])
                assert network.prefixlen >= 16, f"{policy['metadata']['name']}: {network}"
                assert network.is_private, f"{policy['metadata']['name']}: {network}"
                assert not block.get("except"), "narrow the range instead"
            if blocks:  # a backend range on one port: nothing else there is reachable
                assert len(rule["ports"]) == 1 and "endPort" not in rule["ports"][0], rule


def test_access_files_are_what_docs_deploy_points_at() -> None:
    deploy_doc = (REPO / "docs" / "DEPLOY.md").read_text(encoding="utf-8")
    assert "access/kafka-users.yaml" in deploy_doc and "access/s3/" in deploy_doc
    assert {p.stem for p in (ACCESS / "s3").glob("*.json")} == set(SERVICES)
