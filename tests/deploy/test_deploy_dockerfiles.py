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

import json
import re
from pathlib import Path

import pytest
from deploy_support import (
    BASE_DOCKERFILE,
    REPO,
    ROOT_USERS,
    SERVICES,
    args_of,
    copy_sources,
    final_user,
    ignored,
    parse,
    resolve_from,
)

pytestmark = pytest.mark.unit


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
            if relative in BUILT:  # an output of the build bin/riffloop runs before the images
                assert (REPO / BUILT[relative]).is_file(), f"{source}: nothing builds it"
            else:
                exists = (REPO / relative).exists()
                assert exists, f"{path}:{instruction.line}: {source} does not exist"
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


# Beyond its own folder, what a service image carries: the trainer publishes the trained base
# model at first start (RIFFLOOP_BASE_MODEL_DIR, docs/BASE_MODEL.md) and gates candidates in the
# trained quality embedding.
# The gateway serves the built web page (web/, `npm run build`) on its web port.
IMAGE_ASSETS: dict[str, tuple[str, ...]] = {
    "trainer": ("assets/base-model/", "assets/quality-embedding/"),
    "gateway": ("web/dist/",),
}
IMAGE_PORTS: dict[str, set[str]] = {"gateway": {"8080"}}
# Build outputs images copy (never committed): the script that makes each.
BUILT = {"web/dist": "web/build.mjs"}


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
    expected = [f"services/{service}/", *IMAGE_ASSETS.get(service, ())]
    assert copies == expected, f"copies {copies}: only its own folder (and its assets)"
    (cmd,) = args_of(instructions, "CMD")
    assert json.loads(cmd) == ["python", "-m", f"services.{service}"], "exec-form CMD"
    exposed = set(" ".join(args_of(instructions, "EXPOSE")).split())
    assert exposed == {"50051", "9100"} | IMAGE_PORTS.get(service, set())


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
