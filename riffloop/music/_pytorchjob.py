"""Fine-tuning in a Kubeflow PyTorchJob: the trainer service's ``pytorchjob`` launcher.

The service (RIFFLOOP_TRAIN_LAUNCHER=pytorchjob) hands a fine-tune to GPU pods instead of running
it in its own process:

1. ``write_bundle``: the parent model (MusicDiffusion folder), the training and replay data and
   the TrainingConfig go to ``<jobs_dir>/<job name>/`` on a volume the job's pods mount too
   (ReadWriteMany).
2. ``PyTorchJobLauncher.submit``: the job template (a PyTorchJob manifest, e.g. the ConfigMap of
   deploy/k8s/components/pytorchjob-launcher) with its name and the ``pytorch`` containers'
   arguments set to ``-m riffloop.music finetune --bundle <folder>``, POSTed to the API server.
   The name is derived from the candidate version, so a redelivered training set finds its job
   (409 Conflict) instead of starting a second one.
3. In each pod torchrun starts the ranks; ``run_bundle`` trains data-parallel (``TrainingWorld``)
   and rank 0 checkpoints into ``<folder>/checkpoint`` (a restarted pod resumes from it).
4. ``PyTorchJobLauncher.wait`` polls the job's conditions until Succeeded (or Failed →
   PermanentError; the service stopping → Interrupted, the job keeps running and is found again);
   ``read_result`` turns the checkpoint's EMA weights into the candidate model.

The Kubernetes API is reached over plain HTTPS with the pod's service-account token (re-read for
every request: projected tokens rotate) and the cluster CA, so the ``kubernetes`` client package
is not needed. RBAC: ``create``, ``get`` and ``delete`` on ``pytorchjobs.kubeflow.org`` in the
namespace (docs/DEPLOY.md).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from riffloop.core import (
    ConflictError,
    Interrupted,
    PermanentError,
    TransientError,
    ValidationError,
)
from riffloop.music._distributed import TrainingWorld
from riffloop.music._model import MusicDiffusion
from riffloop.music._train import (
    CHECKPOINT_FILE,
    MelDataset,
    Trainer,
    TrainingConfig,
    export_checkpoint,
    load_checkpoint_state,
)

__all__ = [
    "KubernetesApi",
    "PyTorchJobLauncher",
    "read_result",
    "run_bundle",
    "write_bundle",
]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
JOBS_PATH = "/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
PARENT_DIR = "parent"
INPUTS_FILE = "inputs.pt"
CHECKPOINT_DIR = "checkpoint"
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


# -- the bundle on the shared volume ---------------------------------------------------------


def write_bundle(
    folder: str | os.PathLike[str],
    model: MusicDiffusion,
    data: MelDataset,
    config: TrainingConfig,
    replay: MelDataset | None = None,
) -> Path:
    """Step 1. An existing bundle (a redelivered set) is kept: its job may be running on it."""
    path = Path(folder)
    if (path / INPUTS_FILE).exists():
        return path
    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging / PARENT_DIR)

    def source(d: MelDataset | None) -> dict[str, Any] | None:
        if d is None:
            return None
        return {"images": d.images, "weights": d.weights, "manifest": json.dumps(d.manifest)}

    inputs = {
        "config": json.dumps(config.to_dict()),
        "data": source(data),
        "replay": source(replay),
    }
    torch.save(inputs, staging / INPUTS_FILE)
    os.replace(staging, path)  # the job never sees half a bundle
    return path


def _inputs(folder: Path) -> tuple[TrainingConfig, MelDataset, MelDataset | None]:
    state = torch.load(folder / INPUTS_FILE, weights_only=True)

    def source(d: dict[str, Any] | None) -> MelDataset | None:
        if d is None:
            return None
        return MelDataset(d["images"], d["weights"], json.loads(d["manifest"]))

    data = source(state["data"])
    assert data is not None
    return TrainingConfig.from_dict(json.loads(state["config"])), data, source(state["replay"])


def run_bundle(
    folder: str | os.PathLike[str],
    device: torch.device,
    world: TrainingWorld | None = None,
    checkpoint_every_s: float = 300.0,
) -> int:
    """Step 3, on every rank: train the bundle's fine-tune to its end; resumes from the
    bundle's checkpoint when a restarted pod finds one. Returns the step reached."""
    path = Path(folder)
    config, data, replay = _inputs(path)
    checkpoint = path / CHECKPOINT_DIR
    if (checkpoint / CHECKPOINT_FILE).exists():
        trainer = Trainer.resume(checkpoint, data, replay, config, device=device, world=world)
    else:
        model = MusicDiffusion.from_pretrained(path / PARENT_DIR)
        trainer = Trainer(model, data, config, replay, device=device, world=world)
    if trainer.step_count < config.total_steps:
        trainer.train(
            progress=False, checkpoint_dir=checkpoint, checkpoint_every_s=checkpoint_every_s
        )
    return trainer.step_count


def read_result(folder: str | os.PathLike[str], version: str) -> MusicDiffusion:
    """Step 4: the candidate (EMA weights, LoRA merged) of a finished bundle, on the CPU
    whatever device the job trained on."""
    path = Path(folder)
    config, _, _ = _inputs(path)
    step = int(load_checkpoint_state(path / CHECKPOINT_DIR)["step"])
    if step < config.total_steps:
        raise PermanentError(f"the job stopped at step {step} of {config.total_steps}")
    return export_checkpoint(path / CHECKPOINT_DIR, path / "candidate", version)


# -- the Kubernetes API ----------------------------------------------------------------------


class KubernetesApi:
    """JSON requests to the API server: ``base_url`` (https://host:port), a bearer token read
    from ``token_file`` for each request, TLS verified against ``ca_file``."""

    def __init__(
        self,
        base_url: str,
        token_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_file = Path(token_file) if token_file else None
        self.ca_file = Path(ca_file) if ca_file else None
        self.timeout_s = timeout_s

    def _tls(self) -> ssl.SSLContext | None:
        """Verified against the cluster CA (read per request, like the token: it rotates too)."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    @classmethod
    def in_cluster(
        cls, account_dir: Path = SERVICE_ACCOUNT_DIR, environ: dict[str, str] | None = None
    ) -> KubernetesApi:
        """From inside a pod: KUBERNETES_SERVICE_HOST/PORT and the mounted service account."""
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        files = [account_dir / "token", account_dir / "ca.crt"]
        if not host or not port or not all(f.is_file() for f in files):
            raise ValidationError(
                "not in a pod with a service-account token: KUBERNETES_SERVICE_HOST/PORT and "
                f"{account_dir}/token and ca.crt are needed"
            )
        host = f"[{host}]" if ":" in host else host  # IPv6
        return cls(f"https://{host}:{port}", account_dir / "token", account_dir / "ca.crt")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token_file is not None:
            headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
        req = urllib.request.Request(self.base_url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._tls()) as resp:
                return int(resp.status), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                return int(exc.code), json.loads(payload or b"null")
            except ValueError:
                return int(exc.code), {"message": payload.decode(errors="replace")}
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise TransientError(f"Kubernetes API {method} {path}: {exc}") from exc


@dataclass
class PyTorchJobLauncher:
    """Creates and watches fine-tune PyTorchJobs made from ``template`` in ``namespace``."""

    api: KubernetesApi
    namespace: str
    template: dict[str, Any]
    jobs_dir: Path
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if self.template.get("kind") != "PyTorchJob":
            raise ValidationError("the job template must be a PyTorchJob manifest")
        for kind, replica in self.template["spec"]["pytorchReplicaSpecs"].items():
            names = [c["name"] for c in replica["template"]["spec"]["containers"]]
            if "pytorch" not in names:
                raise ValidationError(f"the template's {kind} has no container named pytorch")

    @classmethod
    def from_files(
        cls, template: str | os.PathLike[str], jobs_dir: str | os.PathLike[str], **kwargs: Any
    ) -> PyTorchJobLauncher:
        """In a pod: the template file (a mounted ConfigMap), the pod's own namespace."""
        account_dir = kwargs.pop("account_dir", SERVICE_ACCOUNT_DIR)
        api = kwargs.pop("api", None) or KubernetesApi.in_cluster(account_dir)
        namespace = kwargs.pop("namespace", None) or (account_dir / "namespace").read_text()
        manifest = yaml.safe_load(Path(template).read_text())
        return cls(api, namespace.strip(), manifest, Path(jobs_dir), **kwargs)

    @staticmethod
    def job_name(version: str) -> str:
        name = re.sub(r"[^a-z0-9-]+", "-", f"riffloop-finetune-{version}".lower()).strip("-")
        if not _DNS_1035.match(name):
            raise ValidationError(f"version {version!r} gives no valid job name")
        return name

    def job(self, name: str, bundle: Path) -> dict[str, Any]:
        """Step 2's manifest: the template with this name and the finetune arguments."""
        job = copy.deepcopy(self.template)
        job["metadata"] = {**job.get("metadata", {}), "name": name, "namespace": self.namespace}
        job["metadata"].pop("generateName", None)
        args = ["-m", "riffloop.music", "finetune", f"--bundle={bundle}"]
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            # YAML anchors (template: *pod) load as one shared object: give each its own
            replica["template"] = copy.deepcopy(replica["template"])
            for container in replica["template"]["spec"]["containers"]:
                if container["name"] == "pytorch":
                    container["args"] = [*container.get("args", []), *args]
        return job

    def _path(self, name: str = "") -> str:
        base = JOBS_PATH.format(namespace=self.namespace)
        return f"{base}/{name}" if name else base

    def submit(self, job: dict[str, Any]) -> bool:
        """POST the job; False when one of that name exists already (a redelivery)."""
        status, body = self.api.request("POST", self._path(), job)
        if status in (200, 201, 202):
            return True
        if status == 409:
            return False
        message = body.get("message", "") if isinstance(body, dict) else ""
        if status in (401, 403):
            raise PermanentError(f"creating PyTorchJobs is not allowed ({status}): {message}")
        if status == 404:
            raise PermanentError("no PyTorchJob API: is the Kubeflow training operator installed?")
        if status >= 500 or status == 429:
            raise TransientError(f"creating the PyTorchJob failed ({status}): {message}")
        raise PermanentError(f"the API server refused the PyTorchJob ({status}): {message}")

    def state(self, name: str) -> str:
        """The job's latest true condition: Created, Running, Restarting, Succeeded, Failed
        (or "" before the operator has seen it)."""
        status, body = self.api.request("GET", self._path(name))
        if status == 404:
            raise ConflictError(f"PyTorchJob {name} is gone")
        if status != 200:
            raise TransientError(f"reading PyTorchJob {name} failed ({status})")
        conditions = (body.get("status") or {}).get("conditions") or []
        true = [c for c in conditions if c.get("status") == "True"]
        return str(true[-1]["type"]) if true else ""

    def wait(
        self, name: str, stopping: threading.Event | None = None, timeout_s: float | None = None
    ) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stopping = stopping or threading.Event()
        while True:
            state = self.state(name)
            if state == "Succeeded":
                return
            if state == "Failed":
                raise PermanentError(f"PyTorchJob {name} failed (kubectl describe pytorchjob)")
            if deadline is not None and time.monotonic() >= deadline:
                raise TransientError(f"PyTorchJob {name} is still {state or 'pending'}")
            if stopping.wait(self.poll_s):
                raise Interrupted(f"trainer stopping; PyTorchJob {name} keeps running")

    def delete(self, name: str) -> None:
        self.api.request("DELETE", self._path(name))

    def finetune(
        self,
        model: MusicDiffusion,
        data: MelDataset,
        config: TrainingConfig,
        replay: MelDataset | None,
        version: str,
        stopping: threading.Event | None = None,
    ) -> MusicDiffusion:
        """Steps 1–4: the candidate ``version`` fine-tuned from ``model`` in a PyTorchJob."""
        bundle = self.launch(model, data, config, replay, version)
        self.wait(bundle.name, stopping)
        return read_result(bundle, version)

    def launch(
        self,
        model: MusicDiffusion,
        data: MelDataset,
        config: TrainingConfig,
        replay: MelDataset | None,
        version: str,
    ) -> Path:
        """Steps 1–2; returns the bundle folder, named like its job."""
        name = self.job_name(version)
        bundle = write_bundle(self.jobs_dir / name, model, data, config, replay)
        self.submit(self.job(name, bundle))
        return bundle
