"""The image layout, without a container engine: lay out /app exactly as the Dockerfiles' COPY
instructions would (filtered by .dockerignore), run the build step that generates the proto code,
and import every service's entry module from that tree alone. This catches a service that needs a
file the images do not carry, which the structural lint cannot see.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from deploy_support import (
    BASE_DOCKERFILE,
    OVERLAYS,
    REPO,
    SERVICES,
    copy_sources,
    ignored,
    of_kind,
    parse,
    render,
    run,
)

pytestmark = [pytest.mark.unit, pytest.mark.slow]


def lay_out(dockerfile: Path, app: Path) -> None:
    """Copy what the COPY instructions of ``dockerfile`` put under WORKDIR /app."""
    for instruction in parse(dockerfile):
        if instruction.keyword != "COPY":
            continue
        sources = copy_sources(instruction)
        if not sources:
            continue  # COPY --from=<stage>: the dependencies, already in this interpreter
        destination = instruction.args.split()[-1]
        if destination.startswith("/"):
            continue  # outside /app (the lock file, for pip in the deps stage)
        for source in sources:
            root = REPO / source.rstrip("/")
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for path in files:
                relative = path.relative_to(REPO).as_posix()
                if ignored(relative):
                    continue
                target = app / destination.rstrip("/") / path.relative_to(root)
                if root.is_file():
                    target = app / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def test_services_import_from_the_image_tree(tmp_path: Path) -> None:
    present = [s for s in SERVICES if (REPO / "services" / s / "__main__.py").is_file()]
    if not present:
        pytest.skip("no service is in the tree yet")
    app = tmp_path / "app"
    lay_out(BASE_DOCKERFILE, app)
    for service in present:
        lay_out(REPO / "services" / service / "Dockerfile", app)
    assert not (app / "riffloop" / "v1" / "events_pb2.py").exists(), "generated code was copied"
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("RIFFLOOP_")
    }
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    generated = run(
        [sys.executable, "scripts/gen_proto.py", "--force", "--quiet"], cwd=app, env=env
    )
    assert generated.returncode == 0, generated.stderr
    modules = ", ".join(repr(f"services.{s}.__main__") for s in present)
    script = (
        "import importlib, pathlib, sys\n"
        f"for name in ({modules},):\n"
        "    module = importlib.import_module(name)\n"
        f"    assert pathlib.Path(module.__file__).is_relative_to({str(app)!r}), module.__file__\n"
        "import riffloop\n"
        f"assert pathlib.Path(riffloop.__file__).is_relative_to({str(app)!r})\n"
    )
    result = run([sys.executable, "-c", script], cwd=app, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_image_carries_the_base_model_its_settings_name(
    tmp_path: Path, overlay: str
) -> None:
    """Every overlay serves the trained base model: RIFFLOOP_BASE_MODEL_DIR names the copy the
    trainer image holds (every file of assets/base-model, weights included), and no overlay
    turns on the untrained smoke-test model."""
    app = tmp_path / "app"
    lay_out(REPO / "services" / "trainer" / "Dockerfile", app)
    (settings,) = [
        c["data"]
        for c in of_kind(render(overlay), "ConfigMap")
        if c["metadata"]["name"].startswith("riffloop-trainer-settings")
    ]
    assert "RIFFLOOP_UNTRAINED_BASE" not in settings
    path = settings["RIFFLOOP_BASE_MODEL_DIR"]
    assert path.startswith("/app/"), path  # WORKDIR /app of the base image
    copied = app / path.removeprefix("/app/")
    source = REPO / "assets" / "base-model"
    expected = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert sorted(p.relative_to(copied) for p in copied.rglob("*") if p.is_file()) == expected
    assert (copied / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 1_000_000
