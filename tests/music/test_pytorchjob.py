"""The PyTorchJob launcher against a fake API server whose fake operator runs the job's command
(``python -m riffloop.music finetune --bundle …``) in-process: the requests it makes, the
candidate it reads back (the same weights as an in-process fine-tune), redelivery, failures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from riffloop.core import Interrupted, PermanentError, ValidationError
from riffloop.music import (
    MelConfig,
    MelDataset,
    ModelConfig,
    MusicDiffusion,
    Trainer,
    TrainingConfig,
)
from riffloop.music.__main__ import main as music_cli
from riffloop.music._pytorchjob import KubernetesApi, PyTorchJobLauncher

pytestmark = [pytest.mark.unit, pytest.mark.slow]

TINY_MEL = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
NAMESPACE = "riffloop"
TEMPLATE = """
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: template
  labels: {app.kubernetes.io/component: training-job}
spec:
  nprocPerNode: "1"
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: OnFailure
      template: &pod
        spec:
          containers:
            - name: pytorch
              image: riffloop/trainer:0.1.0
              command: [python, -m, torch.distributed.run]
              args: [--max-restarts=0]
    Worker:
      replicas: 1
      restartPolicy: OnFailure
      template: *pod
"""


class FakeApiServer:
    """PyTorchJobs in a dict; ``operator`` decides what a created job does (runs it, fails…)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []  # method, path, Authorization
        self.runs = 0
        self.create_status = 201
        self.outcome = "run"  # run | fail | hang
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self, method: str) -> None:
                server.requests.append((method, self.path, self.headers.get("Authorization", "")))
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._reply(401, {"message": "Unauthorized"})
                    return
                base = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs"
                name = self.path[len(base) + 1 :] if self.path.startswith(base + "/") else ""
                if method == "POST" and self.path == base:
                    length = int(self.headers["Content-Length"])
                    job = json.loads(self.rfile.read(length))
                    if server.create_status != 201:
                        self._reply(server.create_status, {"message": "no"})
                    elif job["metadata"]["name"] in server.jobs:
                        self._reply(409, {"reason": "AlreadyExists"})
                    else:
                        server.jobs[job["metadata"]["name"]] = job
                        server.operate(job)
                        self._reply(201, job)
                elif method == "GET" and name in server.jobs:
                    self._reply(200, server.jobs[name])
                elif method == "DELETE" and name in server.jobs:
                    del server.jobs[name]
                    self._reply(200, {"status": "Success"})
                else:
                    self._reply(404, {"reason": "NotFound"})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _condition(self, job: dict[str, Any], kind: str) -> None:
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        for c in conditions:
            c["status"] = "False"
        conditions.append({"type": kind, "status": "True"})

    def operate(self, job: dict[str, Any]) -> None:
        """The operator: the pod runs the container's arguments after torchrun's own."""
        self._condition(job, "Created")
        if self.outcome == "hang":
            self._condition(job, "Running")
            return
        if self.outcome == "fail":
            self._condition(job, "Failed")
            return
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"
        ]
        args = container["args"]
        assert args[: args.index("-m")] == ["--max-restarts=0"]  # torchrun's, kept
        cli = args[args.index("riffloop.music") + 1 :]
        self.runs += 1
        code = music_cli([*cli, "--device=cpu", "--threads=1"])  # one rank
        self._condition(job, "Succeeded" if code == 0 else "Failed")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, PyTorchJobLauncher]]:
    torch.set_num_threads(1)
    server = FakeApiServer(token="token-1")
    token = tmp_path / "token"
    token.write_text("token-1\n")
    launcher = PyTorchJobLauncher(
        KubernetesApi(server.url, token_file=token),
        NAMESPACE,
        yaml.safe_load(TEMPLATE),
        tmp_path / "jobs",
        poll_s=0.01,
    )
    yield server, launcher
    server.close()


def _inputs() -> tuple[MusicDiffusion, MelDataset, MelDataset, TrainingConfig]:
    g = torch.Generator().manual_seed(1)
    data = MelDataset.from_images(
        torch.rand((6, 1, 16, 16), generator=g) * 2 - 1,
        torch.rand(6, generator=g) + 0.5,
        {"trainset_id": "ts-1"},
    )
    replay = MelDataset.from_images(torch.rand((5, 1, 16, 16), generator=g) * 2 - 1)
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=3)
    model.version = "v0001"
    config = TrainingConfig(total_steps=3, batch_size=4, replay_ratio=0.5, learning_rate=1e-3)
    return model, data, replay, config


def test_a_fine_tune_runs_in_the_job_and_comes_back_as_the_candidate(
    api: tuple[FakeApiServer, PyTorchJobLauncher],
) -> None:
    server, launcher = api
    model, data, replay, config = _inputs()
    candidate = launcher.finetune(model, data, config, replay, version="v0002")

    name = "riffloop-finetune-v0002"
    assert server.requests[0] == (
        "POST",
        f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs",
        "Bearer token-1",
    )
    assert all(r[1].endswith(name) for r in server.requests[1:])
    job = server.jobs[name]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["labels"] == {"app.kubernetes.io/component": "training-job"}
    bundle = f"--bundle={launcher.jobs_dir / name}"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():  # one template (a YAML anchor)
        (container,) = replica["template"]["spec"]["containers"]
        assert container["args"] == ["--max-restarts=0", "-m", "riffloop.music", "finetune", bundle]
    assert server.runs == 1
    # the same fine-tune in this process: the candidate is its EMA model
    reference = Trainer(model, data, config, replay)
    reference.train(progress=False)
    expected = reference.ema_model("v0002")
    assert candidate.version == "v0002" and candidate.parent == "v0001"
    for key, tensor in expected.unet.state_dict().items():
        assert torch.equal(candidate.unet.state_dict()[key], tensor), key


def test_a_redelivered_set_finds_its_job_instead_of_starting_another(
    api: tuple[FakeApiServer, PyTorchJobLauncher], tmp_path: Path
) -> None:
    server, launcher = api
    model, data, replay, config = _inputs()
    first = launcher.finetune(model, data, config, replay, version="v0002")
    (tmp_path / "token").write_text("token-2")  # a rotated projected token is read again
    server.token = "token-2"
    again = launcher.finetune(model, data, config, replay, version="v0002")
    assert server.runs == 1
    assert [r[0] for r in server.requests].count("POST") == 2  # the second got 409
    for key, tensor in first.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[key], tensor)


def test_failures_are_permanent_and_a_stop_leaves_the_job_running(
    api: tuple[FakeApiServer, PyTorchJobLauncher],
) -> None:
    server, launcher = api
    model, data, replay, config = _inputs()
    server.outcome = "fail"
    with pytest.raises(PermanentError, match="failed"):
        launcher.finetune(model, data, config, replay, version="v0002")
    server.outcome = "hang"
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(Interrupted):
        launcher.finetune(model, data, config, replay, version="v0003", stopping=stopping)
    assert launcher.state("riffloop-finetune-v0003") == "Running"
    server.create_status = 403
    with pytest.raises(PermanentError, match="not allowed"):
        launcher.finetune(model, data, config, replay, version="v0004")
    server.create_status = 404
    with pytest.raises(PermanentError, match="training operator"):
        launcher.finetune(model, data, config, replay, version="v0005")


def test_in_cluster_configuration(tmp_path: Path) -> None:
    account = tmp_path / "sa"
    account.mkdir()
    with pytest.raises(ValidationError):
        KubernetesApi.in_cluster(account, {})
    (account / "token").write_text("t")
    with pytest.raises(ValidationError):
        KubernetesApi.in_cluster(account, {})
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    api = KubernetesApi.in_cluster(
        account, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert api.base_url == "https://10.96.0.1:443"
    v6 = KubernetesApi.in_cluster(
        account, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert v6.base_url == "https://[fd00::1]:443"
    assert PyTorchJobLauncher.job_name("v0002") == "riffloop-finetune-v0002"
    with pytest.raises(ValidationError):
        PyTorchJobLauncher(api, NAMESPACE, {"kind": "Job"}, tmp_path)
