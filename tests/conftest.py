"""Shared fixtures: a real S3 server (moto's server mode on 127.0.0.1) and a local Ray."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # the repository root: configs, jobs, cwd of job subprocesses

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, with credentials and endpoint in the environment.

    Yields the endpoint URL. Everything that talks S3 (s3fs, boto3, Ray workers started
    afterwards) finds it through ``AWS_ENDPOINT_URL``.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def create_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a uniquely named bucket on the S3 server at ``endpoint``; return its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the local S3 server; yields its name."""
    yield create_bucket(s3_server)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """An embedded local Ray cluster (2 CPUs) that sees the S3 server's environment."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def submit_ray_job(address: str, env: dict, entrypoint: list[str], cwd: str, timeout: float = 420,
                   startup: float = 120) -> subprocess.CompletedProcess:
    """``ray job submit --address ADDRESS --working-dir . -- ENTRYPOINT`` from ``cwd``, waiting for the job.

    The head needs a moment before its job agent answers: retried until it takes the job (at most
    ``startup`` seconds).
    """
    submit = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
              "--working-dir", ".", "--", *entrypoint]
    deadline = time.time() + startup
    while True:
        out = subprocess.run(submit, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if "submitted successfully" in out.stdout or time.time() > deadline:
            return out
        time.sleep(3)


def free_port_range(width: int, avoid=()) -> int:
    """A start port whose next ``width`` ports look free and include none of ``avoid``."""
    avoid = set(avoid)
    for _ in range(50):
        start = free_port()
        span = range(start, start + width)
        if start + width < 65000 and avoid.isdisjoint(span) and all(_port_free(p) for p in span):
            return start
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


STOP_GRACE_S = 5  # what a node's processes get to exit on SIGTERM before SIGKILL
START_ATTEMPTS = 3  # starts of a head, each on fresh ports, before a test gives up on it


class RayNode:
    """One ``ray start --block`` of this machine in its own process session, temp dir and ports;
    :meth:`stop` kills that session (never ``ray stop``: other clusters on the machine live on).

    A head is returned once its dashboard answers (``ray job submit`` needs it); one whose start
    dies or never answers is killed and started again on fresh ports (``START_ATTEMPTS``), and
    the last attempt's ``ray start`` output is in the error."""

    def __init__(self, head_address: str | None = None, num_cpus: int = 2, resources: dict | None = None):
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        self._node_id: str | None = None
        for _ in range(START_ATTEMPTS):
            self._start(head_address, num_cpus, resources)
            if head_address is not None or self._dashboard_answers():
                return
            log = Path(self.temp, "ray_start.log").read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"ray start --head: no dashboard after {START_ATTEMPTS} attempts; last output:\n{log}")

    def _start(self, head_address: str | None, num_cpus: int, resources: dict | None) -> None:
        self.temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: unix socket paths are limited
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        if head_address is None:
            names += ["port", "dashboard-port", "ray-client-server-port"]
        ports: dict[str, int] = {}
        while len(ports) < len(names):  # distinct: the OS may hand out a just-released port again
            port = free_port()
            if port not in ports.values():
                ports[names[len(ports)]] = port
        low = free_port_range(40, avoid=ports.values())
        role = (["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"] if head_address is None
                else [f"--address={head_address}"])
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", *role, "--block",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp}",
               f"--min-worker-port={low}", f"--max-worker-port={low + 39}", "--disable-usage-stats",
               *([f"--resources={json.dumps(resources)}"] if resources else []),
               *(f"--{k}={v}" for k, v in ports.items())]
        with open(Path(self.temp, "ray_start.log"), "w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.gcs = f"127.0.0.1:{ports['port']}" if head_address is None else head_address
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}" if head_address is None else None

    def _dashboard_answers(self, timeout: float = 90) -> bool:
        """True once the dashboard's HTTP API answers; False if ``ray start`` exits or ``timeout`` passes."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5) as response:
                    if response.status == 200:
                        return True
            time.sleep(1)
        return False

    def raylet(self) -> int:
        """The pid of this node's raylet (waits up to 120 s for it to start)."""
        return self._raylet()[0]

    @property
    def node_id(self) -> str:
        """This node's Ray node id (hex), from its raylet's command line."""
        if self._node_id is None:
            self._node_id = next(a.split("=", 1)[1] for a in self._raylet()[1] if a.startswith("--node_id="))
        return self._node_id

    def _raylet(self) -> tuple[int, list[str]]:
        """(pid, command line) of the running raylet in this node's process session."""
        deadline = time.time() + 120
        while time.time() < deadline:
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        comm, rest = f.read().rsplit(")", 1)
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        args = f.read().decode().split("\0")
                except (OSError, ValueError):
                    continue
                session = int(rest.split()[3])
                if comm.endswith("(raylet") and session == self.proc.pid and any(a.startswith("--node_id=") for a in args):
                    return int(pid), args
            time.sleep(0.5)
        raise RuntimeError(f"no raylet in the session of ray start (pid {self.proc.pid})")

    def stop(self) -> None:
        """SIGTERM to the session this node started (ray start and its children), SIGKILL to what
        is left after a few seconds: ``ray start --block`` and the GCS outlive a SIGTERM."""
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def ray_head(s3_server):
    """A one-node cluster (:class:`RayNode`, 2 CPUs, dashboard for ``ray job submit``); yields
    (dashboard address for ``ray job submit --address``, environment to submit with)."""
    head = RayNode(num_cpus=2)
    try:
        yield head.dashboard, head.env
    finally:
        head.stop()


@pytest.fixture
def ray_two_nodes(s3_server):
    """A 2-node Ray cluster on this machine: a head (3 CPUs, dashboard for ``ray job submit``) and a
    second node (2 CPUs and the custom resource ``second_node``); yields (head, second) RayNodes.
    The head alone holds 2 one-CPU actors and a decode task: a job that loses the second node
    restarts its actor there and still has a CPU for the decode tasks it must redo."""
    head = RayNode(num_cpus=3)
    second = None
    try:
        head.node_id  # the head is up before the second node joins
        second = RayNode(head.gcs, resources={"second_node": 1})
        second.node_id
        yield head, second
    finally:
        for node in (second, head):
            if node is not None:
                node.stop()
