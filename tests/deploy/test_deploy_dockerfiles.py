"""Structural lint of the Dockerfiles (no container engine here, so they cannot be built).

- the base image: python:3.11-slim, installs the pinned lock file, generates the proto code at build
  time, ends as a non-root user;
- each service image: FROM the base, copies only its own folder, ends non-root, and its CMD runs
  ``python -m services.<name>`` whose ``services/<name>/__main__.py`` exists (skipped, with the
  reason, while a service is not in the tree yet);
- no ADD of URLs (or ADD at all: COPY says what it does), every COPY source exists and is not
  excluded by .dockerignore, and the exposed ports are the ones the manifests use.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import REPO, SERVICES

pytestmark = pytest.mark.unit

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


def all_dockerfiles() -> list[Path]:
    return [BASE_DOCKERFILE, *(REPO / "services" / s / "Dockerfile" for s in SERVICES)]


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_remote_or_implicit_add(path: Path) -> None:
    instructions = parse(path)
    assert not args_of(instructions, "ADD"), f"{path}: use COPY (ADD fetches URLs and unpacks tars)"
    for instruction in instructions:
        assert not re.search(r"\b(curl|wget)\b.*https?://", instruction.args), (
            f"{path}:{instruction.line}: downloads at build time; pin it in requirements.lock"
        )


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_copy_sources_exist_and_reach_the_build_context(path: Path) -> None:
    for instruction in parse(path):
        if instruction.keyword != "COPY":
            continue
        for source in copy_sources(instruction):
            relative = source.rstrip("/")
            assert (REPO / relative).exists(), f"{path}:{instruction.line}: {source} does not exist"
            assert not ignored(relative), f"{path}:{instruction.line}: .dockerignore drops {source}"


def test_dockerignore_keeps_generated_code_and_vcs_out() -> None:
    for path in (
        ".git",
        ".venv",
        "riffloop/v1/events_pb2.py",
        "tests/conftest.py",
        "docs/DEPLOY.md",
        "riffloop/core/__pycache__/x.pyc",
        ".riffloop/data",
    ):
        assert ignored(path), f".dockerignore should exclude {path}"
    for path in ("requirements.lock", "riffloop/core/__init__.py", "services/gateway/__main__.py"):
        assert not ignored(path), f".dockerignore must keep {path}"


def test_base_image() -> None:
    instructions = parse(BASE_DOCKERFILE)
    stages = [resolve_from(instructions, i) for i in instructions if i.keyword == "FROM"]
    assert stages and all(s.startswith("python:3.11-slim") for s in stages), stages
    runs = " ".join(args_of(instructions, "RUN"))
    assert "-r /tmp/requirements.lock" in runs, "install the pinned lock, not loose requirements"
    assert "scripts/gen_proto.py" in runs, "generate the proto code at build time"
    user = final_user(instructions)
    assert user and user.split(":")[0] not in ROOT_USERS | {"root"}, f"final USER is {user!r}"
    assert user.split(":")[0] == "10001", "uid must match runAsUser in deploy/k8s"
    assert set(" ".join(args_of(instructions, "EXPOSE")).split()) == {"50051", "9100"}


def _base_user() -> str | None:
    return final_user(parse(BASE_DOCKERFILE))


@pytest.mark.parametrize("service", SERVICES)
def test_service_image(service: str) -> None:
    path = REPO / "services" / service / "Dockerfile"
    assert path.is_file(), f"services/{service}/Dockerfile is missing"
    instructions = parse(path)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1, "a thin image: one stage on top of riffloop-base"
    assert resolve_from(instructions, froms[0]).startswith("riffloop-base")
    user = final_user(instructions, inherited=_base_user())
    assert user and user.split(":")[0] not in ROOT_USERS, f"final USER is {user!r}"
    copies = [s for i in instructions if i.keyword == "COPY" for s in copy_sources(i)]
    assert copies == [f"services/{service}/"], f"copies {copies}: only its own folder"
    (cmd,) = args_of(instructions, "CMD")
    assert json.loads(cmd) == ["python", "-m", f"services.{service}"], "exec-form CMD"
    assert set(" ".join(args_of(instructions, "EXPOSE")).split()) == {"50051", "9100"}


@pytest.mark.parametrize("service", SERVICES)
def test_cmd_module_exists(service: str) -> None:
    folder = REPO / "services" / service
    if not (folder / "__init__.py").exists():
        pytest.skip(f"services/{service} is not in the tree yet (only its Dockerfile is)")
    assert (folder / "__main__.py").is_file(), f"python -m services.{service} needs __main__.py"


def test_every_service_folder_has_an_image() -> None:
    folders = {p.parent.name for p in (REPO / "services").glob("*/__main__.py")}
    assert folders <= set(SERVICES), (
        f"services without a Dockerfile/Deployment: {folders - set(SERVICES)}"
    )


def test_lint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the helpers see a remote ADD and a root final user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "ARG BASE_IMAGE=riffloop-base\nFROM ${BASE_IMAGE}\n"
        "ADD https://example.org/model.bin /app/\nUSER 10001\nRUN true \\\n  && true\nUSER root\n"
        'CMD ["python", "-m", "services.x"]\n',
        encoding="utf-8",
    )
    instructions = parse(bad)
    assert args_of(instructions, "ADD") == ["https://example.org/model.bin /app/"]
    assert final_user(instructions, inherited="10001:10001") == "root"
    assert [i.keyword for i in instructions].count("RUN") == 1


def test_the_lock_pins_every_package() -> None:
    """The base image installs requirements.lock as it is: every line must be name==version."""
    lock = REPO / "requirements.lock"
    if not lock.is_file():
        pytest.skip("requirements.lock is not in the tree yet (bin/riffloop lock writes it)")
    lines = [
        line.split("#", 1)[0].strip()
        for line in lock.read_text(encoding="utf-8").splitlines()
        if line.split("#", 1)[0].strip()
    ]
    assert lines
    loose = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.!+\-]+", line)]
    assert not loose, f"unpinned lines in requirements.lock: {loose}"
